//! The `confab` analyzer: how message text becomes search terms, the same at
//! index and at query time (docs/SEARCH.md has the rules with examples).
//!
//! 1. Text is cut into *words* at whitespace and punctuation (anything that
//!    is not a letter, a digit or a combining mark).
//! 2. Each word is cut into *runs* of one script: Latin/other alphabetic
//!    letters and digits form one kind of run, CJK (Hangul, Han, Kana)
//!    another. "confab에서" is the runs "confab" and "에서".
//! 3. An alphanumeric run becomes one term: lowercased, then stemmed with the
//!    Snowball English stemmer ("Running" → "run"); digits are kept as they
//!    are ("2024"). Runs longer than [`MAX_RUN_BYTES`] are dropped.
//! 4. A CJK run of n ≥ 2 characters becomes its n−1 overlapping bigrams
//!    ("채팅을" → "채팅", "팅을") — never across a space, so "채팅 을" has no
//!    "팅을". Korean attaches particles and endings to words, so any
//!    two-syllable piece of a word finds it: "채팅" finds "채팅을".
//! 5. At index time a CJK run also yields its *first character* as a term,
//!    at the position of its first bigram, so one-syllable queries work:
//!    "비" finds "비가 와요". At query time a run yields that single
//!    character only when it is one character long (so "채팅" asks for the
//!    bigram alone, not also for "채"). A one-syllable query matches words
//!    that start with it — not a syllable in the middle of a word.
//!
//! Positions: every alphanumeric term and every bigram takes the next
//! position, so the bigrams of a word are adjacent and a multi-syllable word
//! is matched as a phrase of its bigrams.

use std::sync::Arc;

use tantivy::tokenizer::{Token, TokenStream, Tokenizer};

/// The name the analyzer is registered under in every index.
pub const ANALYZER: &str = "confab";
/// Alphanumeric runs longer than this (bytes) are not indexed (hashes, base64…).
pub const MAX_RUN_BYTES: usize = 64;

/// Index or query analysis (rule 5 differs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Index,
    Query,
}

/// One term with its position and byte range in the analysed text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    pub text: String,
    pub position: usize,
    pub from: usize,
    pub to: usize,
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x1100..=0x11FF     // Hangul Jamo
        | 0x3040..=0x30FF   // Hiragana, Katakana
        | 0x3130..=0x318F   // Hangul compatibility Jamo
        | 0x3400..=0x4DBF   // CJK extension A
        | 0x4E00..=0x9FFF   // CJK unified ideographs
        | 0xA960..=0xA97F   // Hangul Jamo extended A
        | 0xAC00..=0xD7AF   // Hangul syllables
        | 0xD7B0..=0xD7FF   // Hangul Jamo extended B
        | 0xF900..=0xFAFF   // CJK compatibility ideographs
        | 0xFF66..=0xFF9F   // half-width Katakana
        | 0x20000..=0x2FFFF // CJK extensions B…
    )
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || is_cjk(c) || is_mark(c)
}

/// Combining marks keep a word together (accents written separately).
fn is_mark(c: char) -> bool {
    matches!(c as u32, 0x0300..=0x036F | 0x1AB0..=0x1AFF | 0x20D0..=0x20FF | 0xFE20..=0xFE2F)
}

/// Splits `text` into terms. `stem` is applied to alphanumeric runs.
pub fn analyze(text: &str, mode: Mode, stemmer: &frostem::Stemmer) -> Vec<Term> {
    let mut out = Vec::new();
    let mut position = 0usize;
    let mut chars = text.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if !is_word_char(c) {
            chars.next();
            continue;
        }
        // One run: CJK or not, within a word.
        let cjk = is_cjk(c);
        let mut run: Vec<(usize, char)> = Vec::new();
        while let Some(&(i, c)) = chars.peek() {
            if !is_word_char(c) || is_cjk(c) != cjk {
                break;
            }
            run.push((i, c));
            chars.next();
        }
        let end = chars.peek().map(|&(i, _)| i).unwrap_or(text.len());
        if cjk {
            cjk_terms(&run, end, mode, &mut position, &mut out);
        } else if end - start <= MAX_RUN_BYTES {
            let lower = text[start..end].to_lowercase();
            let stemmed = stemmer.stem(&lower).into_owned();
            out.push(Term {
                text: stemmed,
                position,
                from: start,
                to: end,
            });
            position += 1;
        }
    }
    out
}

fn cjk_terms(
    run: &[(usize, char)],
    end: usize,
    mode: Mode,
    position: &mut usize,
    out: &mut Vec<Term>,
) {
    let byte_end = |k: usize| run.get(k + 1).map(|&(i, _)| i).unwrap_or(end);
    let first = run[0];
    if run.len() == 1 || mode == Mode::Index {
        out.push(Term {
            text: first.1.to_string(),
            position: *position,
            from: first.0,
            to: byte_end(0),
        });
    }
    if run.len() == 1 {
        *position += 1;
        return;
    }
    for k in 0..run.len() - 1 {
        let mut s = String::with_capacity(8);
        s.push(run[k].1);
        s.push(run[k + 1].1);
        out.push(Term {
            text: s,
            position: *position,
            from: run[k].0,
            to: byte_end(k + 1),
        });
        *position += 1;
    }
}

/// The analyzer as a tantivy [`Tokenizer`] (index mode). Registered under
/// [`ANALYZER`] on every open of the index; the snippet generator uses it too.
#[derive(Clone)]
pub struct ConfabTokenizer {
    stemmer: Arc<frostem::Stemmer>,
}

impl Default for ConfabTokenizer {
    fn default() -> Self {
        ConfabTokenizer {
            stemmer: Arc::new(frostem::Stemmer::new(frostem::Algorithm::English)),
        }
    }
}

impl ConfabTokenizer {
    pub fn analyze(&self, text: &str, mode: Mode) -> Vec<Term> {
        analyze(text, mode, &self.stemmer)
    }
}

pub struct TermStream {
    terms: std::vec::IntoIter<Term>,
    token: Token,
}

impl Tokenizer for ConfabTokenizer {
    type TokenStream<'a> = TermStream;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> TermStream {
        TermStream {
            terms: self.analyze(text, Mode::Index).into_iter(),
            token: Token::default(),
        }
    }
}

impl TokenStream for TermStream {
    fn advance(&mut self) -> bool {
        match self.terms.next() {
            Some(t) => {
                self.token = Token {
                    offset_from: t.from,
                    offset_to: t.to,
                    position: t.position,
                    text: t.text,
                    position_length: 1,
                };
                true
            }
            None => false,
        }
    }

    fn token(&self) -> &Token {
        &self.token
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(text: &str, mode: Mode) -> Vec<(String, usize)> {
        ConfabTokenizer::default()
            .analyze(text, mode)
            .into_iter()
            .map(|t| (t.text, t.position))
            .collect()
    }

    fn texts(text: &str, mode: Mode) -> Vec<String> {
        terms(text, mode).into_iter().map(|t| t.0).collect()
    }

    #[test]
    fn korean_words_become_bigrams_plus_first_syllable() {
        assert_eq!(
            terms("채팅을 시작", Mode::Index),
            [
                ("채".into(), 0),
                ("채팅".into(), 0),
                ("팅을".into(), 1),
                ("시".into(), 2),
                ("시작".into(), 2)
            ]
        );
        assert_eq!(texts("채팅을", Mode::Query), ["채팅", "팅을"]);
        assert_eq!(texts("비", Mode::Query), ["비"]);
        // Never across a space.
        assert!(!texts("채팅 을", Mode::Index).contains(&"팅을".to_string()));
    }

    #[test]
    fn latin_is_lowercased_and_stemmed_digits_kept() {
        assert_eq!(
            texts("Running SERVERS in 2024!", Mode::Index),
            ["run", "server", "in", "2024"]
        );
        assert_eq!(texts("confab에서", Mode::Query), ["confab", "에서"]);
        // Stemming leaves Hangul alone.
        assert_eq!(texts("사용", Mode::Query), ["사용"]);
    }

    #[test]
    fn offsets_cover_the_source_text() {
        let text = "Hi 채팅을!";
        for t in ConfabTokenizer::default().analyze(text, Mode::Index) {
            assert!(text.get(t.from..t.to).is_some(), "{t:?}");
        }
        let long = "x".repeat(MAX_RUN_BYTES + 1);
        assert!(texts(&long, Mode::Index).is_empty());
    }
}
