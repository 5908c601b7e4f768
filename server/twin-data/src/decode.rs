//! Decoding an image from untrusted bytes with its size capped before any pixel is allocated.
//!
//! A 40-byte PNG header can claim 100000 × 100000 pixels; decoding it would ask for 30 GB. The
//! decoder reads the header, checks the dimensions and the allocation against [`limits`], and
//! only then decodes, so an oversized image is refused at the cost of its header.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, Limits};

/// The longest side accepted, in pixels: 4× a 4K frame's width, far beyond the recipe's images
/// (the processor's largest bound, 12.8 Mpx, is 3584 × 3584).
pub const MAX_SIDE: u32 = 16_384;

/// The most bytes one decode may allocate: a 16384 × 16384 RGBA8 image.
pub const MAX_ALLOC: u64 = 1 << 30;

/// The limits every decode of an untrusted image runs under.
pub fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_ALLOC);
    limits
}

/// Why bytes are not a usable image; the message never quotes the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a recognised image")]
    Unrecognised,
    #[error("larger than {MAX_SIDE} × {MAX_SIDE} pixels or {MAX_ALLOC} bytes decoded")]
    TooLarge,
    #[error("cannot decode: {0}")]
    Corrupt(String),
}

/// The format of `bytes` and the image they decode to, under [`limits`].
pub fn decode(bytes: &[u8]) -> Result<(ImageFormat, DynamicImage), DecodeError> {
    let format = image::guess_format(bytes).map_err(|_| DecodeError::Unrecognised)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(limits());
    let image = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => DecodeError::TooLarge,
        e => DecodeError::Corrupt(e.to_string()),
    })?;
    Ok((format, image))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// CRC-32 (IEEE), as PNG chunks carry it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A valid 1 × 1 PNG whose header is rewritten to claim `width` × `height` (CRC fixed).
    fn png_claiming(width: u32, height: u32) -> Vec<u8> {
        let mut png = Vec::new();
        image::RgbImage::new(1, 1)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        // Signature (8) + IHDR length (4) + "IHDR" (4), then width and height.
        png[16..20].copy_from_slice(&width.to_be_bytes());
        png[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    }

    #[test]
    fn an_oversized_header_is_refused_before_decoding() {
        let started = std::time::Instant::now();
        let bomb = png_claiming(100_000, 100_000);
        assert_eq!(decode(&bomb).unwrap_err(), DecodeError::TooLarge);
        assert_eq!(
            decode(&png_claiming(MAX_SIDE + 1, 1)).unwrap_err(),
            DecodeError::TooLarge
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn ordinary_images_decode_and_garbage_is_named() {
        let mut png = Vec::new();
        image::RgbImage::new(4, 3)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let (format, image) = decode(&png).unwrap();
        assert_eq!(
            (format, image.width(), image.height()),
            (ImageFormat::Png, 4, 3)
        );
        assert_eq!(decode(b"hello").unwrap_err(), DecodeError::Unrecognised);
        assert!(matches!(
            decode(&png[..png.len() / 2]).unwrap_err(),
            DecodeError::Corrupt(_)
        ));
        // The header rewrite itself is sound: a claim within the limits gets past them.
        assert!(matches!(
            decode(&png_claiming(2, 2)).unwrap_err(),
            DecodeError::Corrupt(_)
        ));
    }
}
