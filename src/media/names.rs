//! File names from clients, made safe: they are shown to other users and
//! sent back in `Content-Disposition`, so they must not carry a path, a
//! control character, a bidirectional override (which can make
//! `photo` U+202E `gpj.exe` read as `photoexe.jpg`) or an unbounded length.

/// The longest name kept, in UTF-8 bytes.
pub const MAX_NAME_BYTES: usize = 200;

/// `name` as it is stored and shown: its last path component, without
/// control and bidirectional-control characters, without leading dots
/// (no hidden files) and surrounding spaces, at most [`MAX_NAME_BYTES`]
/// (cut at a character boundary, the extension kept when it is short);
/// `file` when nothing is left.
pub fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = last
        .chars()
        .filter(|c| !c.is_control() && !is_bidi_control(*c))
        .collect();
    let trimmed = cleaned.trim().trim_start_matches('.').trim();
    if trimmed.is_empty() {
        return "file".to_string();
    }
    if trimmed.len() <= MAX_NAME_BYTES {
        return trimmed.to_string();
    }
    let ext = trimmed
        .rsplit_once('.')
        .map(|(_, e)| e)
        .filter(|e| !e.is_empty() && e.len() <= 16);
    let room = MAX_NAME_BYTES - ext.map_or(0, |e| e.len() + 1);
    let mut cut = room;
    while !trimmed.is_char_boundary(cut) {
        cut -= 1;
    }
    match ext {
        Some(e) => format!("{}.{e}", trimmed[..cut].trim_end()),
        None => trimmed[..cut].trim_end().to_string(),
    }
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_controls_and_overrides_are_taken_out() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("C:\\Users\\me\\사진.jpg"), "사진.jpg");
        assert_eq!(safe_name("a\u{0}b\r\nc.txt"), "abc.txt");
        assert_eq!(safe_name("photo\u{202E}gpj.exe"), "photogpj.exe");
        assert_eq!(safe_name("  .hidden  "), "hidden");
        assert_eq!(safe_name("../"), "file");
        assert_eq!(safe_name(""), "file");
        assert_eq!(safe_name("report (final).pdf"), "report (final).pdf");
    }

    #[test]
    fn long_names_are_cut_on_a_character_boundary_keeping_the_extension() {
        let long = format!("{}.pdf", "가".repeat(100));
        let s = safe_name(&long);
        assert!(s.len() <= MAX_NAME_BYTES, "{}", s.len());
        assert!(s.ends_with("가.pdf"), "{s}");
        let no_ext = "x".repeat(500);
        assert_eq!(safe_name(&no_ext).len(), MAX_NAME_BYTES);
    }
}
