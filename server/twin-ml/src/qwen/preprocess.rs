//! Qwen2.5-VL's image preprocessing, as transformers 5.17's `Qwen2VLImageProcessorPil` does
//! it: convert to RGB, `smart_resize` (both sides multiples of patch × merge = 28, the pixel
//! count brought within `[min_pixels, max_pixels]`, the aspect ratio kept as closely as
//! possible), Pillow's bicubic resize (bit-exact, `crate::resample`), rescale by 1/255,
//! normalise with the OpenAI CLIP mean and std, then cut into flattened patches in the order the
//! vision tower expects: 2×2 merge blocks in raster order, raster order inside a block, each
//! patch `channel × temporal × row × column` with the still image repeated over the temporal
//! patch.

use std::path::Path;

use image::DynamicImage;
use serde::Deserialize;
use serde_json::{Value, json};

use super::vision::Grid;
use crate::MlError;
use crate::clip::preprocess::{OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PREPROCESSOR_FILE};
use crate::resample::{Filter, resize_rgb8};

/// Settings read from `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenPreprocessor {
    pub min_pixels: u64,
    pub max_pixels: u64,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub filter: Filter,
    pub rescale_factor: Option<f64>,
    pub normalize: Option<([f64; 3], [f64; 3])>,
    pub resize: bool,
}

impl Default for QwenPreprocessor {
    /// `Qwen2VLImageProcessorPil`'s defaults.
    fn default() -> Self {
        QwenPreprocessor {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            filter: Filter::Bicubic,
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
            resize: true,
        }
    }
}

/// One image ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedImage {
    /// `[grid.t · grid.h · grid.w, patch_dim]`, row-major.
    pub patches: Vec<f32>,
    pub grid: Grid,
    /// The size the image was resized to, `(height, width)` in pixels.
    pub resized: (usize, usize),
}

#[derive(Deserialize)]
#[serde(default)]
struct Raw {
    do_resize: bool,
    size: Option<Value>,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    patch_size: usize,
    merge_size: usize,
    temporal_patch_size: usize,
    resample: i64,
    do_rescale: bool,
    rescale_factor: f64,
    do_normalize: bool,
    image_mean: Option<[f64; 3]>,
    image_std: Option<[f64; 3]>,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            do_resize: true,
            size: None,
            min_pixels: None,
            max_pixels: None,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            resample: 3,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: None,
            image_std: None,
        }
    }
}

impl QwenPreprocessor {
    /// Reads `dir/preprocessor_config.json`; the defaults when the file is absent (as
    /// transformers does for a checkpoint without one).
    pub fn load(dir: &Path) -> Result<QwenPreprocessor, MlError> {
        let path = dir.join(PREPROCESSOR_FILE);
        if !path.exists() {
            return Ok(QwenPreprocessor::default());
        }
        let value = crate::weights::read_json(&path)?;
        QwenPreprocessor::from_json(&value).map_err(|m| MlError::config(&path, m))
    }

    /// Parses a `preprocessor_config.json` value. `min_pixels` / `max_pixels` win over
    /// `size.shortest_edge` / `size.longest_edge`, as in transformers.
    pub fn from_json(value: &Value) -> Result<QwenPreprocessor, String> {
        let raw: Raw = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        let defaults = QwenPreprocessor::default();
        let size = |key: &str| {
            raw.size
                .as_ref()
                .and_then(|s| s.get(key))
                .and_then(Value::as_u64)
        };
        let min_pixels = raw
            .min_pixels
            .or_else(|| size("shortest_edge"))
            .unwrap_or(defaults.min_pixels);
        let max_pixels = raw
            .max_pixels
            .or_else(|| size("longest_edge"))
            .unwrap_or(defaults.max_pixels);
        if min_pixels > max_pixels {
            return Err(format!(
                "min_pixels {min_pixels} exceeds max_pixels {max_pixels}"
            ));
        }
        if raw.patch_size == 0 || raw.merge_size == 0 || raw.temporal_patch_size == 0 {
            return Err("patch_size, merge_size and temporal_patch_size must be positive".into());
        }
        let filter = Filter::from_pil(raw.resample).ok_or_else(|| {
            format!(
                "resample {} is not a supported Pillow filter (1–5)",
                raw.resample
            )
        })?;
        Ok(QwenPreprocessor {
            min_pixels,
            max_pixels,
            patch_size: raw.patch_size,
            merge_size: raw.merge_size,
            temporal_patch_size: raw.temporal_patch_size,
            filter,
            rescale_factor: raw.do_rescale.then_some(raw.rescale_factor),
            normalize: raw.do_normalize.then(|| {
                (
                    raw.image_mean.unwrap_or(OPENAI_CLIP_MEAN),
                    raw.image_std.unwrap_or(OPENAI_CLIP_STD),
                )
            }),
            resize: raw.do_resize,
        })
    }

    /// These settings with other pixel bounds, as transformers' processor takes `min_pixels` /
    /// `max_pixels` arguments over the file's (lmms-eval's evaluation protocol does so).
    pub fn with_pixel_bounds(
        &self,
        min_pixels: u64,
        max_pixels: u64,
    ) -> Result<QwenPreprocessor, MlError> {
        if min_pixels > max_pixels {
            return Err(MlError::Invalid(format!(
                "min_pixels {min_pixels} exceeds max_pixels {max_pixels}"
            )));
        }
        Ok(QwenPreprocessor {
            min_pixels,
            max_pixels,
            ..self.clone()
        })
    }

    /// The file transformers writes for these settings.
    pub fn to_json(&self) -> Value {
        let (mean, std) = self
            .normalize
            .unwrap_or((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD));
        json!({
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": self.resize,
            "do_rescale": self.rescale_factor.is_some(),
            "rescale_factor": self.rescale_factor.unwrap_or(1.0 / 255.0),
            "do_normalize": self.normalize.is_some(),
            "do_convert_rgb": true,
            "image_mean": mean,
            "image_std": std,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
            "resample": self.filter.pil_code(),
        })
    }

    pub fn save(&self, dir: &Path) -> Result<(), MlError> {
        let path = dir.join(PREPROCESSOR_FILE);
        let text =
            serde_json::to_string_pretty(&self.to_json()).map_err(|e| MlError::io(&path, e))?;
        std::fs::write(&path, text + "\n").map_err(|e| MlError::io(&path, e))
    }

    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// `image` resized (Pillow's bicubic) to `width × height` as this processor rounds that size:
    /// how a built dataset's row shows an image at its `resized_*` size, as its exports do. An
    /// image already at the rounded size is returned as RGB unchanged.
    pub fn resize_rounded(
        &self,
        image: &DynamicImage,
        width: u32,
        height: u32,
    ) -> Result<DynamicImage, String> {
        let (to_h, to_w) = self.target_size(height as usize, width as usize)?;
        let rgb = image.to_rgb8();
        let (from_w, from_h) = (rgb.width() as usize, rgb.height() as usize);
        if (to_w, to_h) == (from_w, from_h) || from_w == 0 || from_h == 0 {
            return Ok(DynamicImage::ImageRgb8(rgb));
        }
        let pixels = resize_rgb8(rgb.as_raw(), from_w, from_h, to_w, to_h, Filter::Bicubic);
        image::RgbImage::from_raw(to_w as u32, to_h as u32, pixels)
            .map(DynamicImage::ImageRgb8)
            .ok_or_else(|| "resizing produced a buffer of the wrong size".to_owned())
    }

    /// The `(height, width)` an image of `height × width` is resized to.
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize), String> {
        if !self.resize {
            let factor = self.patch_size * self.merge_size;
            if !height.is_multiple_of(factor) || !width.is_multiple_of(factor) {
                return Err(format!(
                    "{height}×{width} is not a multiple of {factor} and do_resize is false"
                ));
            }
            return Ok((height, width));
        }
        smart_resize(
            height,
            width,
            self.patch_size * self.merge_size,
            self.min_pixels,
            self.max_pixels,
        )
    }

    /// Preprocesses one image. `name` appears in errors.
    pub fn prepare(&self, image: &DynamicImage, name: &str) -> Result<PreparedImage, MlError> {
        let rgb = crate::clip::preprocess::to_rgb8_like_pillow(image);
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        let bad = |message: String| MlError::Image {
            name: name.to_owned(),
            message,
        };
        if width == 0 || height == 0 {
            return Err(bad(format!("image is {width}×{height}")));
        }
        let (new_h, new_w) = self.target_size(height, width).map_err(bad)?;
        let resized = if (new_h, new_w) == (height, width) {
            rgb.as_raw().clone()
        } else {
            resize_rgb8(rgb.as_raw(), width, height, new_w, new_h, self.filter)
        };

        // The same f64 multiply, f32 cast, f32 subtract and f32 divide numpy performs, once
        // per level and channel.
        let (mean, std) = match self.normalize {
            Some((m, s)) => (m.map(|v| v as f32), s.map(|v| v as f32)),
            None => ([0.0; 3], [1.0; 3]),
        };
        let mut table = [[0f32; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            for (level, out) in row.iter_mut().enumerate() {
                let x = match self.rescale_factor {
                    Some(f) => (level as f64 * f) as f32,
                    None => level as f32,
                };
                *out = if self.normalize.is_some() {
                    (x - mean[c]) / std[c]
                } else {
                    x
                };
            }
        }

        let (p, m, t) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (new_h / p, new_w / p);
        let dim = self.patch_dim();
        let mut patches = vec![0f32; gh * gw * dim];
        let mut row = 0;
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let out = &mut patches[row * dim..(row + 1) * dim];
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            for ti in 0..t {
                                for py in 0..p {
                                    for px in 0..p {
                                        let level = resized[((y0 + py) * new_w + x0 + px) * 3 + c];
                                        out[((c * t + ti) * p + py) * p + px] =
                                            table[c][level as usize];
                                    }
                                }
                            }
                        }
                        row += 1;
                    }
                }
            }
        }
        Ok(PreparedImage {
            patches,
            grid: Grid {
                t: 1,
                h: gh as i64,
                w: gw as i64,
            },
            resized: (new_h, new_w),
        })
    }
}

/// transformers' `smart_resize`, with Python's arithmetic: `round` is round-half-to-even, the
/// scale factor a float square root. Refuses aspect ratios above 200 as transformers does.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(usize, usize), String> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio}"
        ));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn smart_resize_follows_transformers() {
        // Values worked out with transformers 5.17's smart_resize.
        assert_eq!(
            smart_resize(448, 448, 28, 3136, 1_003_520).unwrap(),
            (448, 448)
        );
        assert_eq!(
            smart_resize(230, 150, 28, 3136, 1_003_520).unwrap(),
            (224, 140)
        );
        // 70 / 28 = 2.5 rounds to 2 (half to even), 98 / 28 = 3.5 to 4.
        assert_eq!(smart_resize(70, 98, 28, 0, 1 << 40).unwrap(), (56, 112));
        // Below min_pixels: scaled up, rounded up.
        assert_eq!(smart_resize(20, 30, 28, 3136, 1_003_520).unwrap(), (56, 84));
        // Above max_pixels: scaled down, rounded down, never below one factor.
        assert_eq!(
            smart_resize(900, 700, 28, 3136, 200_704).unwrap(),
            (504, 392)
        );
        assert!(
            smart_resize(2, 500, 28, 3136, 1_003_520)
                .unwrap_err()
                .contains("aspect ratio")
        );
    }

    #[test]
    fn pixel_bounds_override_the_files_and_nothing_else() {
        let file = QwenPreprocessor {
            max_pixels: 512 * 512,
            filter: Filter::Bilinear,
            ..QwenPreprocessor::default()
        };
        let lmms = file.with_pixel_bounds(200_704, 1_605_632).unwrap();
        assert_eq!((lmms.min_pixels, lmms.max_pixels), (200_704, 1_605_632));
        assert_eq!(
            QwenPreprocessor {
                min_pixels: file.min_pixels,
                max_pixels: file.max_pixels,
                ..lmms.clone()
            },
            file
        );
        // 80×100 rounds to 84×112 = 9408 pixels, within the file's bounds; below lmms-eval's
        // 200704 it scales by √(200704 / 8000) and rounds up: 420×504.
        assert_eq!(file.target_size(80, 100).unwrap(), (84, 112));
        assert_eq!(lmms.target_size(80, 100).unwrap(), (420, 504));
        let image = DynamicImage::ImageRgb8(image::RgbImage::new(100, 80));
        let prepared = lmms.prepare(&image, "small").unwrap();
        assert_eq!(prepared.resized, (420, 504));
        assert_eq!(prepared.grid, Grid { t: 1, h: 30, w: 36 });
        let err = file.with_pixel_bounds(10, 9).unwrap_err();
        assert!(err.to_string().contains("min_pixels 10 exceeds"), "{err}");
    }

    #[test]
    fn patches_are_laid_out_in_merge_blocks() {
        let pre = QwenPreprocessor {
            rescale_factor: None,
            normalize: None,
            ..QwenPreprocessor::default()
        };
        // 112×56 image (kept at its size) whose red channel encodes the 14×14 patch column
        // and green the row.
        let mut img = image::RgbImage::new(112, 56);
        for (x, y, px) in img.enumerate_pixels_mut() {
            *px = image::Rgb([(x / 14) as u8, (y / 14) as u8, 0]);
        }
        let out = pre.prepare(&DynamicImage::ImageRgb8(img), "test").unwrap();
        assert_eq!(out.grid, Grid { t: 1, h: 4, w: 8 });
        let dim = pre.patch_dim();
        let first = |row: usize, c: usize| out.patches[row * dim + c * 2 * 14 * 14];
        // Block (0,0) holds patches (0,0) (0,1) (1,0) (1,1); block (0,1) starts at column 2.
        let cols: Vec<f32> = (0..8).map(|r| first(r, 0)).collect();
        let rows: Vec<f32> = (0..8).map(|r| first(r, 1)).collect();
        assert_eq!(cols, vec![0., 1., 0., 1., 2., 3., 2., 3.]);
        assert_eq!(rows, vec![0., 0., 1., 1., 0., 0., 1., 1.]);
    }
}
