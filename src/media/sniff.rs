//! An upload's type, from its first bytes ([`crate::media::SNIFF_BYTES`]):
//! the client's file name and `Content-Type` are never believed. Only an
//! allow-list of image, audio and video types that browsers show without
//! running anything may be served inline; everything else — HTML, SVG,
//! PDF, archives, unknown bytes — is a file: served as a download
//! (`Content-Disposition: attachment`, `application/octet-stream`,
//! `nosniff`), so an upload can never run script in confab's origin.

/// What an attachment is, as clients show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Image,
    Video,
    Audio,
    File,
}

/// What sniffing found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sniffed {
    /// The detected type (`application/octet-stream` when unknown).
    pub mime: &'static str,
    pub kind: Kind,
    /// Whether it may be served inline (in `<img>`, `<audio>`, `<video>`)
    /// under `mime`; otherwise only as a download.
    pub inline: bool,
}

const UNKNOWN: &str = "application/octet-stream";

/// The types served inline, and their kind.
const INLINE: &[(&str, Kind)] = &[
    ("image/jpeg", Kind::Image),
    ("image/png", Kind::Image),
    ("image/gif", Kind::Image),
    ("image/webp", Kind::Image),
    ("audio/ogg", Kind::Audio),
    ("audio/mpeg", Kind::Audio),
    ("audio/m4a", Kind::Audio),
    ("audio/x-wav", Kind::Audio),
    ("audio/aac", Kind::Audio),
    ("audio/x-flac", Kind::Audio),
    ("audio/webm", Kind::Audio),
    ("video/mp4", Kind::Video),
    ("video/webm", Kind::Video),
    ("video/quicktime", Kind::Video),
];

/// The type of an upload that starts with `head`.
pub fn sniff(head: &[u8]) -> Sniffed {
    let Some(t) = infer::get(head) else {
        return file(UNKNOWN);
    };
    let mut mime = t.mime_type();
    // A browser's voice recording (MediaRecorder, Opus) is WebM without a
    // video track.
    if mime == "video/webm" && !has_video_track(head) {
        mime = "audio/webm";
    }
    match INLINE.iter().find(|(m, _)| *m == mime) {
        Some(&(m, kind)) => Sniffed {
            mime: m,
            kind,
            inline: true,
        },
        None => file(mime),
    }
}

fn file(mime: &'static str) -> Sniffed {
    Sniffed {
        mime,
        kind: Kind::File,
        inline: false,
    }
}

/// Whether a WebM (Matroska) header declares a video track: a `TrackType`
/// element (ID 0x83, size 1) of value 1.
fn has_video_track(head: &[u8]) -> bool {
    head.windows(3).any(|w| w == [0x83, 0x81, 0x01])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bytes_decide_not_the_name() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
        assert_eq!(
            sniff(png),
            Sniffed {
                mime: "image/png",
                kind: Kind::Image,
                inline: true
            }
        );
        let jpeg = [0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10, b'J', b'F', b'I', b'F'];
        assert_eq!(sniff(&jpeg).kind, Kind::Image);
        assert_eq!(sniff(&jpeg).mime, "image/jpeg");
        // Text claiming nothing, HTML, SVG, a PDF: files, never inline.
        for bytes in [
            &b"just some notes"[..],
            b"<!DOCTYPE html><html><script>alert(1)</script>",
            b"<?xml version=\"1.0\"?><svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>",
            b"%PDF-1.7\n%\xe2\xe3\xcf\xd3",
            b"",
        ] {
            let s = sniff(bytes);
            assert_eq!(s.kind, Kind::File, "{bytes:?}");
            assert!(!s.inline, "{bytes:?}");
        }
        assert_eq!(sniff(b"%PDF-1.7\n").mime, "application/pdf");
        assert_eq!(sniff(b"nothing known").mime, UNKNOWN);
    }

    #[test]
    fn webm_without_a_video_track_is_audio() {
        // EBML header, DocType "webm", then an audio track (TrackType 2).
        let mut audio = vec![0x1A, 0x45, 0xDF, 0xA3, 0x9F, 0x42, 0x82, 0x84];
        audio.extend_from_slice(b"webm");
        audio.extend_from_slice(&[0x16, 0x54, 0xAE, 0x6B, 0x83, 0x81, 0x02]);
        let s = sniff(&audio);
        assert_eq!(
            (s.mime, s.kind, s.inline),
            ("audio/webm", Kind::Audio, true)
        );
        let mut video = audio.clone();
        video.extend_from_slice(&[0x83, 0x81, 0x01]);
        assert_eq!(sniff(&video).kind, Kind::Video);
    }
}
