//! Photos: decoded with limits (a file that declares more pixels than
//! allowed is refused from its header, before anything is allocated: a
//! decompression bomb costs nothing), thumbnails with the camera's
//! orientation applied, and the copy other users download without the
//! metadata (EXIF, with its GPS position; XMP; IPTC; comments).
//!
//! Metadata is taken out losslessly where the format allows: JPEG
//! segments, PNG chunks and WebP chunks are dropped and the rest copied
//! byte for byte. A JPEG whose EXIF says it is rotated is re-encoded
//! upright instead (its orientation lives in the EXIF being removed). A
//! GIF is served as it is (GIFs do not carry EXIF).

use std::io::Cursor;

use ::image::codecs::jpeg::JpegEncoder;
use ::image::codecs::png::PngEncoder;
use ::image::metadata::Orientation;
use ::image::{DynamicImage, ImageDecoder, ImageEncoder, ImageReader, Limits};

/// Limits on what is decoded.
#[derive(Debug, Clone, Copy)]
pub struct PhotoLimits {
    /// Width × height.
    pub max_pixels: u64,
    /// Memory a decode may take.
    pub max_alloc: u64,
}

impl Default for PhotoLimits {
    fn default() -> PhotoLimits {
        PhotoLimits {
            max_pixels: 50_000_000,
            max_alloc: 512 << 20,
        }
    }
}

/// A photo's size as it is shown (its orientation applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhotoInfo {
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PhotoError {
    #[error("the image is {width}×{height} pixels, more than the limit of {max} pixels")]
    TooLarge { width: u32, height: u32, max: u64 },
    #[error("the image cannot be read: {0}")]
    Undecodable(String),
}

fn undecodable(e: impl std::fmt::Display) -> PhotoError {
    PhotoError::Undecodable(e.to_string())
}

/// Decodes `bytes` whole (a truncated or damaged image fails here), its
/// orientation applied.
pub fn decode(bytes: &[u8], limits: PhotoLimits) -> Result<DynamicImage, PhotoError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(undecodable)?;
    let mut l = Limits::default();
    l.max_alloc = Some(limits.max_alloc);
    reader.limits(l);
    let mut decoder = reader.into_decoder().map_err(undecodable)?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(PhotoError::TooLarge {
            width,
            height,
            max: limits.max_pixels,
        });
    }
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Checks that `bytes` is a whole image within the limits, and its size
/// as shown.
pub fn probe(bytes: &[u8], limits: PhotoLimits) -> Result<PhotoInfo, PhotoError> {
    let img = decode(bytes, limits)?;
    Ok(PhotoInfo {
        width: img.width(),
        height: img.height(),
    })
}

/// A thumbnail at most `side` pixels wide and high (the aspect ratio
/// kept, upright): a JPEG, or a PNG when the photo has transparency.
/// Returns its bytes, its MIME type and its size.
pub fn thumbnail(
    bytes: &[u8],
    limits: PhotoLimits,
    side: u32,
) -> Result<(Vec<u8>, &'static str, PhotoInfo), PhotoError> {
    let img = decode(bytes, limits)?;
    let small = if img.width() > side || img.height() > side {
        img.thumbnail(side, side)
    } else {
        img
    };
    let info = PhotoInfo {
        width: small.width(),
        height: small.height(),
    };
    let mut out = Vec::new();
    if small.color().has_alpha() {
        let rgba = small.to_rgba8();
        PngEncoder::new(&mut out)
            .write_image(
                &rgba,
                info.width,
                info.height,
                ::image::ExtendedColorType::Rgba8,
            )
            .map_err(undecodable)?;
        Ok((out, "image/png", info))
    } else {
        let rgb = small.to_rgb8();
        JpegEncoder::new_with_quality(&mut out, 80)
            .write_image(
                &rgb,
                info.width,
                info.height,
                ::image::ExtendedColorType::Rgb8,
            )
            .map_err(undecodable)?;
        Ok((out, "image/jpeg", info))
    }
}

/// `bytes` (a photo of type `mime`) without its metadata, as other users
/// download it (see the module docs).
pub fn without_metadata(
    bytes: &[u8],
    mime: &str,
    limits: PhotoLimits,
) -> Result<Vec<u8>, PhotoError> {
    match mime {
        "image/jpeg" => {
            let rotated = jpeg_orientation(bytes).is_some_and(|o| o != Orientation::NoTransforms);
            if rotated {
                let img = decode(bytes, limits)?;
                let mut out = Vec::new();
                JpegEncoder::new_with_quality(&mut out, 92)
                    .encode_image(&img.to_rgb8())
                    .map_err(undecodable)?;
                Ok(out)
            } else {
                strip_jpeg(bytes)
            }
        }
        "image/png" => strip_png(bytes),
        "image/webp" => strip_webp(bytes),
        _ => Ok(bytes.to_vec()),
    }
}

/// The JPEG's EXIF orientation, if it has one.
fn jpeg_orientation(bytes: &[u8]) -> Option<Orientation> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_decoder()
        .ok()?
        .orientation()
        .ok()
}

/// A JPEG without its APP1 (EXIF, XMP), APP12, APP13 (IPTC) and COM
/// segments; everything else (JFIF, the ICC profile in APP2, Adobe's
/// APP14, the tables and the scan) copied as it is.
fn strip_jpeg(bytes: &[u8]) -> Result<Vec<u8>, PhotoError> {
    let bad = || PhotoError::Undecodable("a damaged JPEG".into());
    if bytes.get(..2) != Some(&[0xFF, 0xD8]) {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..2]);
    let mut i = 2;
    loop {
        let marker = *bytes.get(i + 1).ok_or_else(bad)?;
        if bytes[i] != 0xFF {
            return Err(bad());
        }
        if marker == 0xFF {
            // Fill bytes before a marker.
            i += 1;
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            // The scan (and everything after it) or the end: as it is.
            out.extend_from_slice(&bytes[i..]);
            return Ok(out);
        }
        if (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            out.extend_from_slice(&bytes[i..i + 2]);
            i += 2;
            continue;
        }
        let len_bytes = bytes.get(i + 2..i + 4).ok_or_else(bad)?;
        let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
        let end = i + 2 + len;
        if len < 2 || end > bytes.len() {
            return Err(bad());
        }
        let drop = matches!(marker, 0xE1 | 0xEC | 0xED | 0xFE);
        if !drop {
            out.extend_from_slice(&bytes[i..end]);
        }
        i = end;
    }
}

/// A PNG without its `eXIf`, `tEXt`, `zTXt`, `iTXt` and `tIME` chunks.
fn strip_png(bytes: &[u8]) -> Result<Vec<u8>, PhotoError> {
    const SIG: &[u8] = b"\x89PNG\r\n\x1a\n";
    let bad = || PhotoError::Undecodable("a damaged PNG".into());
    if bytes.get(..8) != Some(SIG) {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(SIG);
    let mut i = 8;
    while i < bytes.len() {
        let head = bytes.get(i..i + 8).ok_or_else(bad)?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let end = i
            .checked_add(12)
            .and_then(|v| v.checked_add(len))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(bad)?;
        let kind = &head[4..8];
        if !matches!(kind, b"eXIf" | b"tEXt" | b"zTXt" | b"iTXt" | b"tIME") {
            out.extend_from_slice(&bytes[i..end]);
        }
        i = end;
        if kind == b"IEND" {
            break;
        }
    }
    Ok(out)
}

/// A WebP without its `EXIF` and `XMP ` chunks (and their flags in the
/// `VP8X` header), its RIFF size corrected.
fn strip_webp(bytes: &[u8]) -> Result<Vec<u8>, PhotoError> {
    let bad = || PhotoError::Undecodable("a damaged WebP".into());
    if bytes.get(..4) != Some(b"RIFF") || bytes.get(8..12) != Some(b"WEBP") {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..12]);
    let mut i = 12;
    while i + 8 <= bytes.len() {
        let kind = &bytes[i..i + 4];
        let len =
            u32::from_le_bytes([bytes[i + 4], bytes[i + 5], bytes[i + 6], bytes[i + 7]]) as usize;
        let end = (i + 8 + len + (len & 1)).min(bytes.len());
        if i + 8 + len > bytes.len() {
            return Err(bad());
        }
        if kind == b"VP8X" && len >= 1 {
            let at = out.len() + 8;
            out.extend_from_slice(&bytes[i..end]);
            // Flags: bit 3 EXIF, bit 2 XMP.
            out[at] &= !0b0000_1100;
        } else if kind != b"EXIF" && kind != b"XMP " {
            out.extend_from_slice(&bytes[i..end]);
        }
        i = end;
    }
    let size = u32::try_from(out.len() - 8).map_err(|_| bad())?;
    out[4..8].copy_from_slice(&size.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::image::{Rgb, RgbImage, Rgba, RgbaImage};

    /// An EXIF APP1 segment: orientation `o` and a GPS latitude.
    fn exif_app1(o: u16) -> Vec<u8> {
        // TIFF, little-endian: IFD0 with Orientation (0x0112) and a
        // GPSInfo pointer (0x8825) to an IFD with GPSLatitudeRef "N".
        let mut t = Vec::new();
        t.extend_from_slice(b"II*\0");
        t.extend_from_slice(&8u32.to_le_bytes());
        t.extend_from_slice(&2u16.to_le_bytes());
        t.extend_from_slice(&0x0112u16.to_le_bytes());
        t.extend_from_slice(&3u16.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&u32::from(o).to_le_bytes());
        t.extend_from_slice(&0x8825u16.to_le_bytes());
        t.extend_from_slice(&4u16.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&38u32.to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes());
        // GPS IFD at 38: GPSLatitudeRef = "N".
        t.extend_from_slice(&1u16.to_le_bytes());
        t.extend_from_slice(&1u16.to_le_bytes());
        t.extend_from_slice(&2u16.to_le_bytes());
        t.extend_from_slice(&2u32.to_le_bytes());
        t.extend_from_slice(b"N\0\0\0");
        t.extend_from_slice(&0u32.to_le_bytes());
        let mut seg = vec![0xFF, 0xE1];
        seg.extend_from_slice(&((t.len() + 8) as u16).to_be_bytes());
        seg.extend_from_slice(b"Exif\0\0");
        seg.extend_from_slice(&t);
        seg
    }

    /// A 40×20 JPEG (wide), with an EXIF segment saying `orientation`.
    fn jpeg_with_exif(orientation: u16) -> Vec<u8> {
        let img = RgbImage::from_fn(40, 20, |x, _| Rgb([(x * 6) as u8, 90, 200]));
        let mut plain = Vec::new();
        JpegEncoder::new_with_quality(&mut plain, 90)
            .encode_image(&img)
            .expect("encode");
        let mut out = plain[..2].to_vec();
        out.extend_from_slice(&exif_app1(orientation));
        out.extend_from_slice(&plain[2..]);
        out
    }

    fn has(bytes: &[u8], needle: &[u8]) -> bool {
        bytes.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn exif_and_its_gps_are_gone_from_what_others_download() {
        let jpeg = jpeg_with_exif(1);
        assert!(has(&jpeg, b"Exif\0\0"));
        let clean = without_metadata(&jpeg, "image/jpeg", PhotoLimits::default()).expect("strip");
        assert!(!has(&clean, b"Exif"), "no EXIF left");
        assert_eq!(
            clean.len(),
            jpeg.len() - exif_app1(1).len(),
            "lossless: only the segment went"
        );
        assert_eq!(
            probe(&clean, PhotoLimits::default()),
            Ok(PhotoInfo {
                width: 40,
                height: 20
            })
        );
    }

    #[test]
    fn a_rotated_photo_is_shown_and_served_upright() {
        // Orientation 6: the camera was turned; shown 20 wide, 40 high.
        let jpeg = jpeg_with_exif(6);
        let upright = PhotoInfo {
            width: 20,
            height: 40,
        };
        assert_eq!(probe(&jpeg, PhotoLimits::default()), Ok(upright));
        let (thumb, mime, info) = thumbnail(&jpeg, PhotoLimits::default(), 10).expect("thumb");
        assert_eq!(mime, "image/jpeg");
        assert_eq!(
            info,
            PhotoInfo {
                width: 5,
                height: 10
            }
        );
        assert_eq!(probe(&thumb, PhotoLimits::default()), Ok(info));
        let clean = without_metadata(&jpeg, "image/jpeg", PhotoLimits::default()).expect("strip");
        assert!(!has(&clean, b"Exif"));
        assert_eq!(
            probe(&clean, PhotoLimits::default()),
            Ok(upright),
            "re-encoded upright"
        );
    }

    #[test]
    fn a_decompression_bomb_is_refused_from_its_header() {
        // A PNG that declares 100,000 × 100,000 pixels in a few hundred bytes.
        let small = RgbImage::from_pixel(8, 8, Rgb([1, 2, 3]));
        let mut png = Vec::new();
        PngEncoder::new(&mut png)
            .write_image(&small, 8, 8, ::image::ExtendedColorType::Rgb8)
            .expect("encode");
        // IHDR's width and height, then its CRC, recomputed.
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let started = std::time::Instant::now();
        let r = probe(&png, PhotoLimits::default());
        assert_eq!(
            r,
            Err(PhotoError::TooLarge {
                width: 100_000,
                height: 100_000,
                max: 50_000_000
            })
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn a_truncated_or_foreign_file_is_not_a_photo() {
        let jpeg = jpeg_with_exif(1);
        let cut = &jpeg[..jpeg.len() / 2];
        assert!(matches!(
            probe(cut, PhotoLimits::default()),
            Err(PhotoError::Undecodable(_))
        ));
        assert!(matches!(
            probe(
                b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                PhotoLimits::default()
            ),
            Err(PhotoError::Undecodable(_))
        ));
        assert!(strip_jpeg(b"not a jpeg").is_err());
        assert!(strip_png(b"\x89PNG\r\n\x1a\n\0\0\xff\xffIHDR").is_err());
    }

    #[test]
    fn png_text_chunks_and_webp_metadata_are_taken_out() {
        let img = RgbaImage::from_pixel(6, 4, Rgba([10, 20, 30, 128]));
        let mut png = Vec::new();
        PngEncoder::new(&mut png)
            .write_image(&img, 6, 4, ::image::ExtendedColorType::Rgba8)
            .expect("encode");
        // A tEXt chunk after IHDR (8 + 25 bytes).
        let mut text = Vec::new();
        let data = b"Comment\0taken at home";
        text.extend_from_slice(&(data.len() as u32).to_be_bytes());
        text.extend_from_slice(b"tEXt");
        text.extend_from_slice(data);
        let mut crc_in = b"tEXt".to_vec();
        crc_in.extend_from_slice(data);
        text.extend_from_slice(&crc32fast::hash(&crc_in).to_be_bytes());
        let mut with_text = png[..33].to_vec();
        with_text.extend_from_slice(&text);
        with_text.extend_from_slice(&png[33..]);
        let clean =
            without_metadata(&with_text, "image/png", PhotoLimits::default()).expect("strip");
        assert_eq!(clean, png);
        // Its thumbnail keeps the transparency.
        let (_, mime, _) = thumbnail(&with_text, PhotoLimits::default(), 3).expect("thumb");
        assert_eq!(mime, "image/png");

        // WebP: VP8X with the EXIF flag, a VP8L image, an EXIF chunk.
        let mut webp = b"RIFF\0\0\0\0WEBP".to_vec();
        webp.extend_from_slice(b"VP8X");
        webp.extend_from_slice(&10u32.to_le_bytes());
        webp.extend_from_slice(&[0b0000_1000, 0, 0, 0, 5, 0, 0, 3, 0, 0]);
        webp.extend_from_slice(b"EXIF");
        webp.extend_from_slice(&5u32.to_le_bytes());
        webp.extend_from_slice(b"GPS!!\0");
        let size = (webp.len() - 8) as u32;
        webp[4..8].copy_from_slice(&size.to_le_bytes());
        let clean = strip_webp(&webp).expect("strip");
        assert!(!has(&clean, b"EXIF") && !has(&clean, b"GPS"));
        assert_eq!(clean[20], 0, "the EXIF flag is cleared");
        assert_eq!(
            u32::from_le_bytes([clean[4], clean[5], clean[6], clean[7]]) as usize,
            clean.len() - 8
        );
    }
}
