//! Attachments' bytes (issue 22): where they are kept and what they are.
//!
//! - `blobs`: the blob directory of a single node — content-addressed
//!   (SHA-256), deduplicated, each file written to a temporary name,
//!   synced and renamed into place, so a blob that is there is whole. The
//!   bytes never pass through the group-commit writer: a text message
//!   never waits behind an upload.
//! - `sniff`: an upload's type from its first bytes (never the client's
//!   word), and whether it may be shown inline or only downloaded.
//! - `names`: a client's file name made safe to store and to send back in
//!   a `Content-Disposition`.
//! - `photo`: photos decoded with limits (a decompression bomb is refused
//!   from its header), thumbnails upright, and the copy others download
//!   without its metadata (EXIF with its GPS position, XMP, IPTC).
//!
//! Blocking file I/O throughout: callers run it on a blocking thread.

mod blobs;
mod names;
mod photo;
mod sniff;

pub use blobs::{Blob, BlobError, BlobId, BlobStore, BlobWriter, SNIFF_BYTES};
pub use names::{MAX_NAME_BYTES, safe_name};
pub use photo::{PhotoError, PhotoInfo, PhotoLimits, decode, probe, thumbnail, without_metadata};
pub use sniff::{Kind, Sniffed, sniff};
