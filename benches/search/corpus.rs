//! A synthetic chat corpus for the search benchmark: mixed Korean/English
//! messages of realistic lengths whose words follow a Zipf distribution over a
//! vocabulary of ~25,000 forms, and the queries users would type against it.
//!
//! - **Korean**: ~210 real nouns (rough frequency order) and ~6,000 generated
//!   two- or three-syllable nouns, written with a particle most of the time
//!   (은/는, 이/가, 을/를, 에서, 으로/로 … chosen by the final consonant:
//!   채팅을, 서버에서, 검색은); predicates from ~90 real conjugated forms and
//!   ~1,100 하다-verbs (시작해요, 확인했어요, 배포할게요).
//! - **English**: ~330 real words and ~6,000 generated ones (the long tail:
//!   names, jargon, typos).
//! - **Messages**: 45% Korean, 35% English, 20% code-switched (Korean with
//!   English nouns, "PR을 merge했어요"); 5% one- or two-word reactions
//!   (ㅋㅋㅋ, ok, 네), most 3–15 words, 10% 16–30 and 3% 31–60; numbers, times
//!   and emoticons sprinkled in.
//! - **Queries** pick their words log-uniformly by rank, so some hit very
//!   common words and most hit the middle and the tail, as people search.

use std::collections::HashSet;

use rand::Rng;
use rand::rngs::StdRng;

/// Real Korean nouns, roughly most frequent first.
const KO_NOUNS: &[&str] = &[
    "오늘",
    "내일",
    "지금",
    "회의",
    "사람",
    "시간",
    "우리",
    "일정",
    "점심",
    "저녁",
    "서버",
    "채팅",
    "검색",
    "메시지",
    "사진",
    "파일",
    "링크",
    "주말",
    "회사",
    "집",
    "친구",
    "생각",
    "문제",
    "확인",
    "내용",
    "다음",
    "이번",
    "어제",
    "아침",
    "커피",
    "밥",
    "날씨",
    "비",
    "버그",
    "코드",
    "배포",
    "테스트",
    "리뷰",
    "작업",
    "프로젝트",
    "팀장",
    "고객",
    "자료",
    "발표",
    "보고서",
    "업데이트",
    "버전",
    "기능",
    "화면",
    "디자인",
    "데이터",
    "로그",
    "에러",
    "장애",
    "모니터링",
    "알림",
    "계정",
    "비밀번호",
    "로그인",
    "설정",
    "문서",
    "위키",
    "일요일",
    "월요일",
    "화요일",
    "수요일",
    "목요일",
    "금요일",
    "토요일",
    "퇴근",
    "출근",
    "휴가",
    "연차",
    "병원",
    "약속",
    "영화",
    "게임",
    "음악",
    "노래",
    "운동",
    "헬스",
    "산책",
    "여행",
    "비행기",
    "기차",
    "버스",
    "지하철",
    "택시",
    "주차",
    "식당",
    "카페",
    "맛집",
    "치킨",
    "피자",
    "라면",
    "김치",
    "떡볶이",
    "맥주",
    "소주",
    "와인",
    "케이크",
    "생일",
    "선물",
    "축하",
    "결혼",
    "아기",
    "엄마",
    "아빠",
    "동생",
    "언니",
    "오빠",
    "형",
    "누나",
    "선배",
    "후배",
    "동기",
    "학교",
    "수업",
    "시험",
    "과제",
    "숙제",
    "도서관",
    "강의",
    "교수님",
    "학생",
    "가격",
    "할인",
    "배송",
    "주문",
    "결제",
    "환불",
    "쿠폰",
    "이벤트",
    "광고",
    "마케팅",
    "매출",
    "예산",
    "계약",
    "미팅",
    "통화",
    "전화",
    "이메일",
    "답장",
    "연락",
    "공지",
    "질문",
    "답변",
    "의견",
    "피드백",
    "아이디어",
    "계획",
    "목표",
    "결과",
    "성능",
    "속도",
    "용량",
    "메모리",
    "디스크",
    "네트워크",
    "인터넷",
    "와이파이",
    "노트북",
    "컴퓨터",
    "핸드폰",
    "충전기",
    "모니터",
    "키보드",
    "마우스",
    "프린터",
    "회의실",
    "사무실",
    "엘리베이터",
    "주소",
    "위치",
    "지도",
    "근처",
    "동네",
    "서울",
    "부산",
    "제주도",
    "강남",
    "판교",
    "홍대",
    "한강",
    "공원",
    "바다",
    "산",
    "눈",
    "바람",
    "감기",
    "건강",
    "기분",
    "걱정",
    "고민",
    "이야기",
    "소식",
    "뉴스",
    "기사",
    "사진첩",
    "동영상",
    "유튜브",
    "방송",
    "드라마",
    "예능",
    "축구",
    "야구",
    "농구",
    "경기",
    "티켓",
    "공연",
    "전시",
    "쇼핑",
    "옷",
    "신발",
    "가방",
    "시계",
    "안경",
    "우산",
    "청소",
    "빨래",
    "요리",
    "설거지",
    "장보기",
    "마트",
    "편의점",
    "택배",
    "이사",
    "월세",
];

/// Real predicates, conjugated as people type them.
const KO_PREDS: &[&str] = &[
    "해요",
    "했어요",
    "있어요",
    "없어요",
    "돼요",
    "됐어요",
    "좋아요",
    "괜찮아요",
    "알겠습니다",
    "감사합니다",
    "고마워요",
    "미안해요",
    "죄송합니다",
    "할게요",
    "갈게요",
    "왔어요",
    "봐요",
    "봤어요",
    "먹었어요",
    "먹자",
    "가자",
    "하자",
    "어때요",
    "맞아요",
    "아니에요",
    "몰라요",
    "알아요",
    "같아요",
    "보내주세요",
    "올려주세요",
    "알려주세요",
    "확인해주세요",
    "부탁드려요",
    "부탁해요",
    "기다릴게요",
    "도착했어요",
    "출발해요",
    "끝났어요",
    "시작해요",
    "시작했어요",
    "늦을 것 같아요",
    "바빠요",
    "피곤해요",
    "졸려요",
    "배고파요",
    "맛있어요",
    "재밌어요",
    "웃기네요",
    "대박",
    "진짜요",
    "그래요",
    "그렇죠",
    "좋네요",
    "멋져요",
    "예뻐요",
    "힘들어요",
    "쉬어요",
    "잘게요",
    "일어났어요",
    "왔다",
    "갔다",
    "했다",
    "있다",
    "없다",
    "좋다",
    "싫어요",
    "필요해요",
    "가능해요",
    "어려워요",
    "쉬워요",
    "빨라요",
    "느려요",
    "많아요",
    "적어요",
    "커요",
    "작아요",
    "비싸요",
    "싸요",
    "열려요",
    "닫혀요",
    "고쳤어요",
    "바꿨어요",
    "올렸어요",
    "내렸어요",
    "받았어요",
    "보냈어요",
    "찾았어요",
    "잃어버렸어요",
];

/// Nouns that take 하다 (확인 → 확인했어요).
const KO_HADA: &[&str] = &[
    "확인",
    "배포",
    "수정",
    "시작",
    "준비",
    "연락",
    "공유",
    "정리",
    "검색",
    "테스트",
    "리뷰",
    "작업",
    "발표",
    "업데이트",
    "설정",
    "로그인",
    "주문",
    "결제",
    "환불",
    "계약",
    "미팅",
    "통화",
    "전화",
    "답장",
    "공지",
    "질문",
    "답변",
    "계획",
    "운동",
    "산책",
    "여행",
    "주차",
    "축하",
    "결혼",
    "청소",
    "빨래",
    "요리",
    "설거지",
    "이사",
    "출근",
    "퇴근",
    "예약",
    "취소",
    "변경",
    "삭제",
    "추가",
    "저장",
    "복사",
    "설치",
    "재시작",
    "백업",
    "복구",
    "점검",
    "분석",
    "개발",
    "구현",
    "배송",
    "검토",
    "승인",
    "보고",
    "회의",
    "정산",
    "입금",
    "송금",
    "충전",
    "참석",
    "도착",
    "출발",
    "연습",
    "공부",
    "독서",
    "쇼핑",
    "세탁",
    "방문",
    "초대",
    "등록",
    "신청",
    "제출",
    "요청",
    "해결",
    "처리",
    "전달",
    "기록",
    "측정",
    "비교",
    "선택",
    "결정",
    "예상",
    "조사",
    "모집",
    "안내",
];

const HADA_ENDINGS: &[&str] = &[
    "했어요",
    "해요",
    "할게요",
    "했습니다",
    "합니다",
    "해주세요",
    "하고",
    "했어",
    "해",
    "하자",
    "할까요",
    "했는데",
];

/// Common syllables for generated nouns.
const SYLLABLES: &str = "가나다라마바사아자차카타파하거너더러머버서어저처커터퍼허고노도로모보소오조초코토포호구누두루무부수우주추쿠투푸후기니디리미비시이지치키티피히개내대래매배새애재채태해경공동명성정중청한국민상진현수영준서윤지은혜연우민호석훈희선미원용철남북강산천길문화학교전시장방실관원";

/// Particles: (after a final consonant, after a vowel).
const PARTICLES: &[(&str, &str)] = &[
    ("은", "는"),
    ("이", "가"),
    ("을", "를"),
    ("에", "에"),
    ("에서", "에서"),
    ("으로", "로"),
    ("도", "도"),
    ("만", "만"),
    ("의", "의"),
    ("하고", "하고"),
    ("이랑", "랑"),
    ("까지", "까지"),
    ("부터", "부터"),
    ("한테", "한테"),
    ("이에요", "예요"),
];

/// Real English chat words, roughly most frequent first.
const EN_WORDS: &[&str] = &[
    "the",
    "i",
    "you",
    "to",
    "a",
    "and",
    "it",
    "is",
    "that",
    "for",
    "on",
    "in",
    "we",
    "can",
    "this",
    "be",
    "me",
    "do",
    "have",
    "just",
    "so",
    "not",
    "are",
    "will",
    "what",
    "ok",
    "with",
    "at",
    "get",
    "my",
    "if",
    "but",
    "was",
    "your",
    "know",
    "now",
    "there",
    "about",
    "yes",
    "no",
    "one",
    "all",
    "up",
    "like",
    "out",
    "think",
    "thanks",
    "good",
    "when",
    "time",
    "did",
    "how",
    "sure",
    "see",
    "let",
    "go",
    "need",
    "still",
    "today",
    "tomorrow",
    "back",
    "check",
    "should",
    "meeting",
    "going",
    "work",
    "new",
    "looks",
    "great",
    "yeah",
    "lol",
    "sorry",
    "please",
    "done",
    "fix",
    "issue",
    "bug",
    "deploy",
    "server",
    "build",
    "test",
    "tests",
    "release",
    "review",
    "merge",
    "branch",
    "commit",
    "push",
    "pull",
    "request",
    "code",
    "error",
    "logs",
    "crash",
    "latency",
    "search",
    "index",
    "query",
    "chat",
    "message",
    "messages",
    "room",
    "user",
    "users",
    "account",
    "login",
    "password",
    "token",
    "api",
    "endpoint",
    "database",
    "cache",
    "memory",
    "disk",
    "cpu",
    "network",
    "config",
    "update",
    "version",
    "feature",
    "design",
    "docs",
    "doc",
    "ticket",
    "sprint",
    "standup",
    "demo",
    "customer",
    "client",
    "team",
    "manager",
    "lunch",
    "dinner",
    "coffee",
    "weekend",
    "monday",
    "friday",
    "office",
    "home",
    "later",
    "soon",
    "morning",
    "tonight",
    "night",
    "week",
    "month",
    "year",
    "minutes",
    "hour",
    "hours",
    "call",
    "email",
    "link",
    "file",
    "files",
    "photo",
    "video",
    "screen",
    "slides",
    "report",
    "plan",
    "idea",
    "question",
    "answer",
    "problem",
    "help",
    "running",
    "broken",
    "working",
    "slow",
    "fast",
    "again",
    "already",
    "maybe",
    "probably",
    "actually",
    "really",
    "very",
    "much",
    "more",
    "less",
    "some",
    "any",
    "every",
    "first",
    "last",
    "next",
    "before",
    "after",
    "then",
    "than",
    "because",
    "also",
    "too",
    "only",
    "here",
    "where",
    "why",
    "who",
    "which",
    "would",
    "could",
    "make",
    "made",
    "take",
    "took",
    "give",
    "send",
    "sent",
    "look",
    "read",
    "write",
    "wrote",
    "said",
    "say",
    "tell",
    "told",
    "ask",
    "asked",
    "try",
    "tried",
    "want",
    "wait",
    "start",
    "started",
    "stop",
    "finish",
    "finished",
    "ship",
    "shipped",
    "rollback",
    "hotfix",
    "outage",
    "incident",
    "alert",
    "dashboard",
    "metrics",
    "graph",
    "spike",
    "traffic",
    "load",
    "benchmark",
    "profile",
    "perf",
    "flaky",
    "pipeline",
    "ci",
    "staging",
    "production",
    "prod",
    "dev",
    "local",
    "docker",
    "kubernetes",
    "cluster",
    "node",
    "pod",
    "restart",
    "upgrade",
    "migration",
    "schema",
    "table",
    "rows",
    "backup",
    "restore",
    "storage",
    "bucket",
    "upload",
    "download",
    "invoice",
    "payment",
    "refund",
    "order",
    "delivery",
    "price",
    "discount",
    "budget",
    "contract",
    "launch",
    "marketing",
    "sales",
    "revenue",
    "happy",
    "birthday",
    "congrats",
    "awesome",
    "nice",
    "cool",
    "cute",
    "funny",
    "tired",
    "hungry",
    "sick",
    "busy",
    "free",
    "ready",
    "late",
    "early",
    "weather",
    "rain",
    "snow",
    "hot",
    "cold",
    "train",
    "bus",
    "flight",
    "airport",
    "hotel",
    "trip",
    "beach",
    "movie",
    "game",
    "music",
    "song",
    "concert",
    "ticket",
    "gym",
    "run",
    "walk",
    "park",
    "pizza",
    "beer",
    "wine",
    "cake",
    "dog",
    "cat",
    "baby",
    "mom",
    "dad",
    "brother",
    "sister",
    "friend",
    "friends",
    "party",
    "gift",
    "seoul",
    "busan",
];

const REACTIONS: &[&str] = &[
    "ㅋㅋㅋ",
    "ㅋㅋ",
    "ㅎㅎ",
    "ok",
    "ㅇㅇ",
    "네",
    "넵",
    "응",
    "ㅠㅠ",
    "lol",
    "thanks!",
    "감사합니다",
    "좋아요",
    "👍",
    "ㄱㄱ",
    "오케이",
    "yes",
    "nice",
    "ㅇㅋ",
    "헐",
];

const EMOTICONS: &[&str] = &[
    "ㅋㅋ",
    "ㅎㅎ",
    "ㅠㅠ",
    "^^",
    "!!",
    "😂",
    "ㅋㅋㅋㅋ",
    ":)",
    "🙏",
    "?",
];

/// Ranks drawn with probability ∝ 1/(rank + 2.7)^s.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let cdf = (0..n)
            .map(|r| {
                acc += 1.0 / (r as f64 + 2.7).powf(s);
                acc
            })
            .collect::<Vec<_>>();
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut StdRng) -> usize {
        let total = self.cdf.last().copied().unwrap_or(0.0);
        let x = rng.random::<f64>() * total;
        self.cdf.partition_point(|&c| c < x).min(self.cdf.len() - 1)
    }
}

/// A log-uniform rank in `0..n`: as many queries for ranks 1–10 as for
/// 100–1,000 and for 1,000–10,000.
fn query_rank(rng: &mut StdRng, n: usize) -> usize {
    let r = (rng.random::<f64>() * (n as f64).ln()).exp() as usize;
    r.saturating_sub(1).min(n - 1)
}

fn has_final_consonant(word: &str) -> bool {
    word.chars()
        .last()
        .map(|c| (0xAC00..=0xD7A3).contains(&(c as u32)) && !(c as u32 - 0xAC00).is_multiple_of(28))
        .unwrap_or(true)
}

/// Words outside `common`, made of `parts`, `count` of them, distinct.
fn generated(
    rng: &mut StdRng,
    common: &[&str],
    count: usize,
    mut make: impl FnMut(&mut StdRng) -> String,
) -> Vec<String> {
    let mut seen: HashSet<String> = common.iter().map(|s| s.to_string()).collect();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let w = make(rng);
        if seen.insert(w.clone()) {
            out.push(w);
        }
    }
    out
}

pub struct Corpus {
    ko_nouns: Vec<String>,
    ko_preds: Vec<String>,
    en_words: Vec<String>,
    ko_noun_zipf: Zipf,
    ko_pred_zipf: Zipf,
    en_zipf: Zipf,
}

/// What a query tests; the report breaks latency down by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum QueryKind {
    KoreanWord,
    EnglishWord,
    TwoWords,
    Phrase,
    OneSyllable,
}

impl QueryKind {
    pub const ALL: [QueryKind; 5] = [
        QueryKind::KoreanWord,
        QueryKind::EnglishWord,
        QueryKind::TwoWords,
        QueryKind::Phrase,
        QueryKind::OneSyllable,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QueryKind::KoreanWord => "Korean word",
            QueryKind::EnglishWord => "English word",
            QueryKind::TwoWords => "two words",
            QueryKind::Phrase => "quoted phrase",
            QueryKind::OneSyllable => "one syllable",
        }
    }
}

impl Corpus {
    /// The vocabulary is the same for a given seed.
    pub fn new(rng: &mut StdRng) -> Corpus {
        let syllables: Vec<char> = SYLLABLES.chars().collect();
        let ko_extra = generated(rng, KO_NOUNS, 6000, |rng| {
            let n = if rng.random_bool(0.7) { 2 } else { 3 };
            (0..n)
                .map(|_| syllables[rng.random_range(0..syllables.len())])
                .collect()
        });
        let mut ko_nouns: Vec<String> = KO_NOUNS.iter().map(|s| s.to_string()).collect();
        ko_nouns.extend(ko_extra);

        let mut ko_preds: Vec<String> = KO_PREDS.iter().map(|s| s.to_string()).collect();
        for ending in HADA_ENDINGS {
            for noun in KO_HADA {
                ko_preds.push(format!("{noun}{ending}"));
            }
        }

        const CONS: &[&str] = &[
            "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
            "z", "st", "tr", "pl", "ch", "sh", "th", "br", "cr",
        ];
        const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ee", "oo", "ai", "ou", "y"];
        let en_extra = generated(rng, EN_WORDS, 6000, |rng| {
            let parts = rng.random_range(2..=4);
            let mut w = String::new();
            for _ in 0..parts {
                w.push_str(CONS[rng.random_range(0..CONS.len())]);
                w.push_str(VOWELS[rng.random_range(0..VOWELS.len())]);
            }
            if rng.random_bool(0.4) {
                w.push_str(CONS[rng.random_range(0..CONS.len())]);
            }
            w
        });
        let mut en_words: Vec<String> = EN_WORDS.iter().map(|s| s.to_string()).collect();
        en_words.extend(en_extra);

        Corpus {
            ko_noun_zipf: Zipf::new(ko_nouns.len(), 1.0),
            ko_pred_zipf: Zipf::new(ko_preds.len(), 1.0),
            en_zipf: Zipf::new(en_words.len(), 1.0),
            ko_nouns,
            ko_preds,
            en_words,
        }
    }

    /// Distinct word forms the generator can produce (before particles).
    pub fn vocabulary(&self) -> usize {
        self.ko_nouns.len() + self.ko_preds.len() + self.en_words.len()
    }

    fn ko_noun(&self, rng: &mut StdRng) -> String {
        let noun = &self.ko_nouns[self.ko_noun_zipf.sample(rng)];
        if rng.random_bool(0.65) {
            let (after_consonant, after_vowel) = PARTICLES[rng.random_range(0..PARTICLES.len())];
            let p = if has_final_consonant(noun) {
                after_consonant
            } else {
                after_vowel
            };
            format!("{noun}{p}")
        } else {
            noun.clone()
        }
    }

    fn en_word(&self, rng: &mut StdRng) -> &str {
        &self.en_words[self.en_zipf.sample(rng)]
    }

    fn number(rng: &mut StdRng) -> String {
        match rng.random_range(0..6) {
            0 => format!("{}시", rng.random_range(1..=12)),
            1 => format!("{}:{:02}", rng.random_range(0..24), rng.random_range(0..60)),
            2 => format!("{}", rng.random_range(1..100)),
            3 => format!("{}", rng.random_range(100..100_000)),
            4 => format!(
                "{}월 {}일",
                rng.random_range(1..=12),
                rng.random_range(1..=28)
            ),
            _ => format!("#{}", rng.random_range(1..5000)),
        }
    }

    /// Words in one message: most 3–15, some long.
    fn length(rng: &mut StdRng) -> usize {
        let r = rng.random::<f64>();
        if r < 0.87 {
            rng.random_range(3..=15)
        } else if r < 0.97 {
            rng.random_range(16..=30)
        } else {
            rng.random_range(31..=60)
        }
    }

    /// One chat message.
    pub fn message(&self, rng: &mut StdRng) -> String {
        if rng.random_bool(0.05) {
            return REACTIONS[rng.random_range(0..REACTIONS.len())].to_string();
        }
        let words = Self::length(rng);
        let lang = rng.random::<f64>();
        let mut out: Vec<String> = Vec::with_capacity(words + 2);
        if lang < 0.35 {
            // English.
            for i in 0..words {
                let w = if rng.random_bool(0.04) {
                    Self::number(rng)
                } else {
                    self.en_word(rng).to_string()
                };
                if i == 0 && rng.random_bool(0.5) {
                    let mut c = w.chars();
                    let first = c
                        .next()
                        .map(|f| f.to_uppercase().to_string())
                        .unwrap_or_default();
                    out.push(format!("{first}{}", c.as_str()));
                } else {
                    out.push(w);
                }
                if i + 1 < words
                    && rng.random_bool(0.08)
                    && let Some(last) = out.last_mut()
                {
                    last.push(',');
                }
            }
            if let Some(last) = out.last_mut() {
                last.push_str(["", ".", "?", "!", ""][rng.random_range(0..5)]);
            }
        } else {
            // Korean, or Korean with English nouns (code-switching).
            let english_share = if lang < 0.8 { 0.0 } else { 0.35 };
            let mut since_pred = 0;
            for i in 0..words {
                let last = i + 1 == words;
                let clause_end = since_pred >= 2 && rng.random_bool(0.3);
                if last || clause_end {
                    out.push(self.ko_preds[self.ko_pred_zipf.sample(rng)].clone());
                    since_pred = 0;
                    continue;
                }
                since_pred += 1;
                let w = if rng.random_bool(0.04) {
                    Self::number(rng)
                } else if english_share > 0.0 && rng.random_bool(english_share) {
                    let en = self.en_word(rng);
                    if rng.random_bool(0.5) {
                        let (p, _) = PARTICLES[rng.random_range(0..4)];
                        format!("{en}{p}")
                    } else {
                        en.to_string()
                    }
                } else {
                    self.ko_noun(rng)
                };
                out.push(w);
            }
        }
        if rng.random_bool(0.1) {
            out.push(EMOTICONS[rng.random_range(0..EMOTICONS.len())].to_string());
        }
        out.join(" ")
    }

    fn query_ko(&self, rng: &mut StdRng) -> &str {
        &self.ko_nouns[query_rank(rng, self.ko_nouns.len())]
    }

    fn query_en(&self, rng: &mut StdRng) -> &str {
        &self.en_words[query_rank(rng, self.en_words.len())]
    }

    /// A query of `kind`, as a user would type it.
    pub fn query(&self, rng: &mut StdRng, kind: QueryKind) -> String {
        match kind {
            QueryKind::KoreanWord => self.query_ko(rng).to_string(),
            QueryKind::EnglishWord => self.query_en(rng).to_string(),
            QueryKind::TwoWords => match rng.random_range(0..3) {
                0 => format!("{} {}", self.query_ko(rng), self.query_ko(rng)),
                1 => format!("{} {}", self.query_en(rng), self.query_en(rng)),
                _ => format!("{} {}", self.query_ko(rng), self.query_en(rng)),
            },
            QueryKind::Phrase => {
                // Two adjacent words of a message like the stored ones.
                loop {
                    let m = self.message(rng);
                    let words: Vec<&str> = m
                        .split_whitespace()
                        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
                        .filter(|w| !w.is_empty())
                        .collect();
                    if words.len() >= 3 {
                        let i = rng.random_range(0..words.len() - 1);
                        return format!("\"{} {}\"", words[i], words[i + 1]);
                    }
                }
            }
            QueryKind::OneSyllable => self
                .query_ko(rng)
                .chars()
                .next()
                .map(String::from)
                .unwrap_or_else(|| "비".into()),
        }
    }
}
