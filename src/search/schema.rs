//! The index's schema and commit payload: the document fields, a message
//! as a document, and the position and message count each commit records
//! (`FORMAT`; a different value means "rebuild").

use tantivy::TantivyDocument;
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, Schema, TextFieldIndexing, TextOptions,
};

use super::analyzer::ANALYZER;
use crate::store::Message;

/// Written into every commit payload; a different value means "rebuild".
pub(super) const FORMAT: &str = "confab-search-1";

#[derive(Clone, Copy)]
pub(super) struct Fields {
    pub(super) room: Field,
    pub(super) seq: Field,
    pub(super) from: Field,
    pub(super) ts: Field,
    pub(super) text: Field,
}

pub(super) fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let room = b.add_u64_field("room", INDEXED | FAST);
    let seq = b.add_u64_field("seq", FAST);
    let from = b.add_u64_field("from", INDEXED | FAST);
    let ts = b.add_i64_field("ts", INDEXED | FAST);
    let text_opts = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(ANALYZER)
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let text = b.add_text_field("text", text_opts);
    (
        b.build(),
        Fields {
            room,
            seq,
            from,
            ts,
            text,
        },
    )
}

pub(super) fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A commit payload's position and message count. `docs` was added to the
/// payload later; without it the index must hold one message per position
/// (the store numbers messages 1, 2, … without gaps and never deletes one),
/// so an index written before it is still checked.
pub(super) fn parse_payload(p: &str) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(p).ok()?;
    if v.get("format")?.as_str()? != FORMAT {
        return None;
    }
    let pos = v.get("pos")?.as_u64()?;
    let docs = match v.get("docs") {
        Some(d) => d.as_u64()?,
        None => pos,
    };
    Some((pos, docs))
}

pub(super) fn payload(pos: u64, docs: u64) -> String {
    serde_json::json!({"format": FORMAT, "pos": pos, "docs": docs}).to_string()
}

/// The position and message count the index's last commit recorded.
pub(super) fn committed_position(metas: &tantivy::IndexMeta) -> Result<(u64, u64), String> {
    match metas.payload.as_deref().map(parse_payload) {
        Some(Some(p)) => Ok(p),
        None if metas.segments.is_empty() => Ok((0, 0)),
        _ => Err("missing or foreign commit payload".into()),
    }
}

/// A message as an index document.
pub(super) fn document(f: Fields, m: &Message) -> TantivyDocument {
    let mut d = TantivyDocument::default();
    d.add_u64(f.room, m.room.0);
    d.add_u64(f.seq, m.seq);
    d.add_u64(f.from, m.from.0);
    d.add_i64(f.ts, m.ts);
    d.add_text(f.text, &m.text);
    d
}
