//! CLIP's image preprocessing, identical to transformers 5.17's PIL-based processor
//! (`CLIPImageProcessorPil`, what `CLIPImageProcessor` falls back to without torchvision), with
//! every setting read from `preprocessor_config.json`:
//!
//! 1. convert to RGB as Pillow's `Image.convert("RGB")` does (alpha dropped, grey replicated,
//!    16-bit RGB reduced to its high byte, 16-bit grey clipped at 255);
//! 2. resize so the shortest edge is `size.shortest_edge` (long edge `int(size * long / short)`,
//!    `image_transforms.get_resize_output_image_size`) with Pillow's resampling filter
//!    (bicubic for CLIP), reimplemented bit-exactly in [`crate::resample`];
//! 3. centre-crop to `crop_size` with `image_transforms.center_crop`'s rounding (top =
//!    `(h - crop_h) // 2`), zero-padding an image smaller than the crop;
//! 4. rescale (`u8 as f64 * rescale_factor`, then f32) and normalise (`(x - mean) / std` in f32).
//!
//! Steps 1–3 work on u8 exactly as the reference does, and step 4 performs the same IEEE
//! operations in the same order, so the result equals transformers' `pixel_values` for any image
//! both sides decode to the same pixels (PNG; JPEG decoders may differ by a level here and there).

use std::borrow::Cow;
use std::path::Path;

use image::{DynamicImage, RgbImage};
use serde::Deserialize;
use serde_json::{Value, json};
use tch::{Device, Kind, Tensor};

use crate::MlError;
use crate::resample::{Filter, resize_rgb8};

/// The preprocessor's settings file inside a checkpoint directory.
pub const PREPROCESSOR_FILE: &str = "preprocessor_config.json";

/// OpenAI's CLIP normalisation (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// One preprocessed image: `3 × height × width` f32 values, channel-first.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub values: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

/// How the resize step picks its output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// `{"shortest_edge": n}` (or a bare integer): aspect kept, short side `n`.
    ShortestEdge(usize),
    /// `{"shortest_edge": n, "longest_edge": m}`: as DETR-style processors do.
    ShortestEdgeAtMost { shortest: usize, longest: usize },
    /// `{"height": h, "width": w}`: both sides given.
    Exact { height: usize, width: usize },
}

/// `preprocessor_config.json` as transformers' `CLIPImageProcessorPil` reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocessor {
    pub resize: Option<ResizeTo>,
    pub filter: Filter,
    /// `(height, width)`.
    pub crop: Option<(usize, usize)>,
    pub rescale_factor: Option<f64>,
    /// Mean and std per channel; `None` when `do_normalize` is false.
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

#[derive(Deserialize)]
#[serde(default)]
struct RawConfig {
    do_resize: bool,
    size: Option<Value>,
    resample: i64,
    do_center_crop: bool,
    crop_size: Option<Value>,
    do_rescale: bool,
    rescale_factor: f64,
    do_normalize: bool,
    image_mean: Option<Value>,
    image_std: Option<Value>,
    do_convert_rgb: bool,
}

impl Default for RawConfig {
    // CLIPImageProcessorPil's class attributes.
    fn default() -> Self {
        RawConfig {
            do_resize: true,
            size: None,
            resample: 3,
            do_center_crop: true,
            crop_size: None,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: None,
            image_std: None,
            do_convert_rgb: true,
        }
    }
}

fn size_field(value: &Value, key: &str) -> Result<Option<usize>, String> {
    match value.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| Some(n as usize))
            .ok_or_else(|| format!("{key} must be a positive integer, got {v}")),
    }
}

fn channels(value: Option<&Value>, default: [f64; 3], name: &str) -> Result<[f64; 3], String> {
    match value {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => {
            let v = n
                .as_f64()
                .ok_or_else(|| format!("{name} is not a number"))?;
            Ok([v; 3])
        }
        Some(Value::Array(items)) if items.len() == 3 => {
            let mut out = [0.0; 3];
            for (o, item) in out.iter_mut().zip(items) {
                *o = item
                    .as_f64()
                    .ok_or_else(|| format!("{name} holds {item}, not a number"))?;
            }
            Ok(out)
        }
        Some(other) => Err(format!("{name} must be a number or 3 numbers, got {other}")),
    }
}

impl ClipPreprocessor {
    /// The processor transformers builds for a CLIP checkpoint of this input size: shortest
    /// edge and crop both `image_size`, bicubic, OpenAI mean and std.
    pub fn clip_default(image_size: usize) -> ClipPreprocessor {
        ClipPreprocessor {
            resize: Some(ResizeTo::ShortestEdge(image_size)),
            filter: Filter::Bicubic,
            crop: Some((image_size, image_size)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
        }
    }

    /// Reads `dir/preprocessor_config.json`.
    pub fn load(dir: &Path) -> Result<ClipPreprocessor, MlError> {
        let path = dir.join(PREPROCESSOR_FILE);
        let value = crate::weights::read_json(&path)?;
        ClipPreprocessor::from_json(&value).map_err(|m| MlError::config(&path, m))
    }

    /// Parses a `preprocessor_config.json` value; the error names the bad field.
    pub fn from_json(value: &Value) -> Result<ClipPreprocessor, String> {
        let raw: RawConfig = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        if !raw.do_convert_rgb {
            // The model takes three channels; an image that is not RGB cannot be fed without
            // the conversion, and an RGB one is unchanged by it.
            tracing::debug!("do_convert_rgb is false; images are still converted to RGB");
        }
        let resize = if raw.do_resize {
            let size = raw.size.unwrap_or_else(|| json!({"shortest_edge": 224}));
            Some(match &size {
                // A bare integer is a shortest edge for CLIP (`default_to_square=False`).
                Value::Number(_) => ResizeTo::ShortestEdge(
                    size_field(&json!({"size": size}), "size")?.unwrap_or(224),
                ),
                Value::Object(_) => {
                    let shortest = size_field(&size, "shortest_edge")?;
                    let longest = size_field(&size, "longest_edge")?;
                    let (height, width) =
                        (size_field(&size, "height")?, size_field(&size, "width")?);
                    match (shortest, longest, height, width) {
                        (Some(shortest), Some(longest), _, _) => {
                            ResizeTo::ShortestEdgeAtMost { shortest, longest }
                        }
                        (Some(shortest), None, _, _) => ResizeTo::ShortestEdge(shortest),
                        (None, _, Some(height), Some(width)) => ResizeTo::Exact { height, width },
                        _ => {
                            return Err(format!(
                                "size {size} has neither shortest_edge nor height and width"
                            ));
                        }
                    }
                }
                other => return Err(format!("size must be an integer or an object, got {other}")),
            })
        } else {
            None
        };
        let filter = Filter::from_pil(raw.resample).ok_or_else(|| {
            format!(
                "resample {} is not supported (only Pillow's convolution filters: 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)",
                raw.resample
            )
        })?;
        let crop = if raw.do_center_crop {
            let crop = raw
                .crop_size
                .unwrap_or_else(|| json!({"height": 224, "width": 224}));
            Some(match &crop {
                Value::Number(_) => {
                    let n = size_field(&json!({"crop_size": crop}), "crop_size")?.unwrap_or(224);
                    (n, n)
                }
                Value::Object(_) => {
                    match (size_field(&crop, "height")?, size_field(&crop, "width")?) {
                        (Some(h), Some(w)) => (h, w),
                        _ => return Err(format!("crop_size {crop} needs height and width")),
                    }
                }
                other => {
                    return Err(format!(
                        "crop_size must be an integer or an object, got {other}"
                    ));
                }
            })
        } else {
            None
        };
        let normalize = if raw.do_normalize {
            let mean = channels(raw.image_mean.as_ref(), OPENAI_CLIP_MEAN, "image_mean")?;
            let std = channels(raw.image_std.as_ref(), OPENAI_CLIP_STD, "image_std")?;
            if std.contains(&0.0) {
                return Err("image_std holds a zero".into());
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(ClipPreprocessor {
            resize,
            filter,
            crop,
            rescale_factor: raw.do_rescale.then_some(raw.rescale_factor),
            normalize,
        })
    }

    /// The `preprocessor_config.json` transformers writes for these settings.
    pub fn to_json(&self) -> Value {
        let size = match self.resize {
            Some(ResizeTo::ShortestEdge(n)) => json!({"shortest_edge": n}),
            None => json!({"shortest_edge": self.crop.map_or(224, |c| c.0)}),
            Some(ResizeTo::ShortestEdgeAtMost { shortest, longest }) => {
                json!({"shortest_edge": shortest, "longest_edge": longest})
            }
            Some(ResizeTo::Exact { height, width }) => json!({"height": height, "width": width}),
        };
        let (crop_h, crop_w) = self.crop.unwrap_or((224, 224));
        let (mean, std) = self
            .normalize
            .unwrap_or((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD));
        json!({
            "crop_size": {"height": crop_h, "width": crop_w},
            "do_center_crop": self.crop.is_some(),
            "do_convert_rgb": true,
            "do_normalize": self.normalize.is_some(),
            "do_rescale": self.rescale_factor.is_some(),
            "do_resize": self.resize.is_some(),
            "image_mean": mean,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": std,
            "resample": self.filter.pil_code(),
            "rescale_factor": self.rescale_factor.unwrap_or(1.0 / 255.0),
            "size": size,
        })
    }

    /// Writes `dir/preprocessor_config.json`.
    pub fn save(&self, dir: &Path) -> Result<(), MlError> {
        let path = dir.join(PREPROCESSOR_FILE);
        let text =
            serde_json::to_string_pretty(&self.to_json()).map_err(|e| MlError::io(&path, e))?;
        std::fs::write(&path, text + "\n").map_err(|e| MlError::io(&path, e))
    }

    /// The size the resize step produces for an image of `width × height`, as `(height, width)`.
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        match self.resize {
            None => (height, width),
            Some(ResizeTo::Exact { height, width }) => (height, width),
            Some(ResizeTo::ShortestEdge(size)) => shortest_edge_size(width, height, size),
            Some(ResizeTo::ShortestEdgeAtMost { shortest, longest }) => {
                size_with_aspect_ratio(width, height, shortest, longest)
            }
        }
    }

    /// The `[3, H, W]` f32 CPU tensor transformers' processor gives for one image.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<Tensor, MlError> {
        let mut values = Vec::new();
        let (height, width) = self.append_pixel_values(image, &mut values)?;
        Ok(Tensor::from_slice(&values).view([3, height as i64, width as i64]))
    }

    /// One image's pixel values, channel-first, without touching libtorch: for callers that
    /// assemble batches themselves (creating a tensor per image wakes libtorch's thread pool
    /// each time, which costs more than the resize on a small machine).
    pub fn pixel_values(&self, image: &DynamicImage) -> Result<PixelValues, MlError> {
        let mut values = Vec::new();
        let (height, width) = self.append_pixel_values(image, &mut values)?;
        Ok(PixelValues {
            values,
            height,
            width,
        })
    }

    /// A `[N, 3, H, W]` batch built in one buffer. Images must come out the same size (they do
    /// whenever the processor crops).
    pub fn preprocess_batch(&self, images: &[DynamicImage]) -> Result<Tensor, MlError> {
        let mut all = Vec::new();
        let mut shape = None;
        for (i, image) in images.iter().enumerate() {
            let (height, width) = self.append_pixel_values(image, &mut all)?;
            match shape {
                None => {
                    shape = Some((height, width));
                    all.reserve(3 * height * width * (images.len() - 1));
                }
                Some(s) if s != (height, width) => {
                    return Err(MlError::Image {
                        name: format!("#{i} of the batch"),
                        message: format!(
                            "preprocesses to {height}×{width}, the batch's first image to {}×{}",
                            s.0, s.1
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        let (height, width) = shape.unwrap_or((0, 0));
        Ok(Tensor::from_slice(&all).view([images.len() as i64, 3, height as i64, width as i64]))
    }

    /// Appends one image's channel-first pixel values to `out`; returns their height and width.
    fn append_pixel_values(
        &self,
        image: &DynamicImage,
        out: &mut Vec<f32>,
    ) -> Result<(usize, usize), MlError> {
        let rgb = to_rgb8_like_pillow(image);
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        if width == 0 || height == 0 {
            return Err(MlError::Image {
                name: "input".into(),
                message: format!("image is {width}×{height}"),
            });
        }
        let (new_height, new_width) = self.resized_size(width, height);
        let resized: Cow<'_, [u8]> = if (new_height, new_width) == (height, width) {
            Cow::Borrowed(rgb.as_raw())
        } else {
            Cow::Owned(resize_rgb8(
                rgb.as_raw(),
                width,
                height,
                new_width,
                new_height,
                self.filter,
            ))
        };
        let (crop_h, crop_w) = self.crop.unwrap_or((new_height, new_width));
        // Window of the resized image that lands in the output, as center_crop computes it:
        // `top = (h - crop_h) // 2` with Python's floor division, plus the padding offset
        // `ceil((new - orig) / 2)` when the image is smaller than the crop.
        let (top, pad_top) = crop_origin(new_height, crop_h);
        let (left, pad_left) = crop_origin(new_width, crop_w);

        let rescale = self.rescale_factor;
        let (mean, std) = match self.normalize {
            Some((m, s)) => (m.map(|v| v as f32), s.map(|v| v as f32)),
            None => ([0.0; 3], [1.0; 3]),
        };
        let normalize = self.normalize.is_some();
        // Level → value table per channel: the same f64 multiply, f32 cast, f32 subtract and
        // f32 divide numpy performs, done once per level instead of once per pixel.
        let mut table = [[0f32; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            for (level, out) in row.iter_mut().enumerate() {
                let x = match rescale {
                    Some(factor) => (level as f64 * factor) as f32,
                    None => level as f32,
                };
                *out = if normalize { (x - mean[c]) / std[c] } else { x };
            }
        }
        let start = out.len();
        out.resize(start + 3 * crop_h * crop_w, 0.0);
        let values = &mut out[start..];
        for c in 0..3 {
            let plane = &mut values[c * crop_h * crop_w..(c + 1) * crop_h * crop_w];
            for y in 0..crop_h {
                let src_y = y as i64 + top - pad_top;
                for x in 0..crop_w {
                    let src_x = x as i64 + left - pad_left;
                    let inside = (0..new_height as i64).contains(&src_y)
                        && (0..new_width as i64).contains(&src_x);
                    let level = if inside {
                        resized[(src_y as usize * new_width + src_x as usize) * 3 + c]
                    } else {
                        0
                    };
                    plane[y * crop_w + x] = table[c][level as usize];
                }
            }
        }
        Ok((crop_h, crop_w))
    }
}

/// `(offset of the crop window in the padded image, padding before the image)` along one axis:
/// the crop starts at `offset - padding` in the image's own coordinates.
fn crop_origin(size: usize, crop: usize) -> (i64, i64) {
    let (size, crop) = (size as i64, crop as i64);
    let top = (size - crop).div_euclid(2);
    if top >= 0 {
        return (top, 0);
    }
    let padded = crop.max(size);
    let pad = (padded - size + 1) / 2; // ceil((padded - size) / 2)
    (top + pad, pad)
}

/// transformers' `get_resize_output_image_size(size, default_to_square=False)`: the long side
/// is `int(size * long / short)`, a float division truncated (exact here: both operands are
/// integers far below 2^53 and IEEE division rounds once, as Python's does).
pub fn shortest_edge_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = ((size * long) as f64 / short as f64) as usize;
    if width <= height {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// transformers' `get_size_with_aspect_ratio(image_size, size, max_size)`.
fn size_with_aspect_ratio(
    width: usize,
    height: usize,
    size: usize,
    max_size: usize,
) -> (usize, usize) {
    let (h, w) = (height as f64, width as f64);
    let (min_side, max_side) = (h.min(w), h.max(w));
    let mut size = size as f64;
    let mut raw = None;
    if max_side / min_side * size > max_size as f64 {
        let r = max_size as f64 * min_side / max_side;
        raw = Some(r);
        size = r.round_ties_even();
    }
    let size_i = size as usize;
    if (height <= width && height == size_i) || (width <= height && width == size_i) {
        return (height, width);
    }
    let scale_from = raw.unwrap_or(size);
    if width < height {
        (((scale_from * h) / w) as usize, size_i)
    } else {
        (size_i, ((scale_from * w) / h) as usize)
    }
}

/// Pillow's `Image.convert("RGB")` on the image Pillow would have decoded.
pub(crate) fn to_rgb8_like_pillow(image: &DynamicImage) -> Cow<'_, RgbImage> {
    let (w, h) = (image.width(), image.height());
    let from = |pixels: Vec<u8>| {
        Cow::Owned(RgbImage::from_raw(w, h, pixels).unwrap_or_else(|| image.to_rgb8()))
    };
    match image {
        DynamicImage::ImageRgb8(rgb) => Cow::Borrowed(rgb),
        DynamicImage::ImageRgba8(rgba) => {
            from(rgba.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect())
        }
        DynamicImage::ImageLuma8(l) => from(l.pixels().flat_map(|p| [p[0]; 3]).collect()),
        DynamicImage::ImageLumaA8(la) => from(la.pixels().flat_map(|p| [p[0]; 3]).collect()),
        // Pillow reads 16-bit RGB(A) PNGs through the "RGB;16B" raw modes: the high byte.
        DynamicImage::ImageRgb16(rgb) => from(
            rgb.pixels()
                .flat_map(|p| p.0.map(|v| (v >> 8) as u8))
                .collect(),
        ),
        DynamicImage::ImageRgba16(rgba) => from(
            rgba.pixels()
                .flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8))
                .collect(),
        ),
        // 16-bit grey opens as "I;16", whose conversion to RGB clips at 255 (it does not scale).
        DynamicImage::ImageLuma16(l) => {
            from(l.pixels().flat_map(|p| [p[0].min(255) as u8; 3]).collect())
        }
        // 16-bit grey with alpha opens as RGBA through "LA;16B": the high byte.
        DynamicImage::ImageLumaA16(la) => {
            from(la.pixels().flat_map(|p| [(p[0] >> 8) as u8; 3]).collect())
        }
        other => Cow::Owned(other.to_rgb8()),
    }
}

/// Moves a preprocessed batch to where a model runs, in its kind.
pub(crate) fn to_model_input(pixel_values: &Tensor, device: Device, kind: Kind) -> Tensor {
    pixel_values.to_device(device).to_kind(kind)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn output_sizes_follow_transformers() {
        // int(224 * 640 / 480) = 298; portrait keeps width as the short side.
        assert_eq!(shortest_edge_size(640, 480, 224), (224, 298));
        assert_eq!(shortest_edge_size(480, 640, 224), (298, 224));
        assert_eq!(shortest_edge_size(23, 41, 36), (64, 36));
        assert_eq!(shortest_edge_size(50, 50, 32), (32, 32));
    }

    #[test]
    fn crop_rounding_and_padding_follow_center_crop() {
        assert_eq!(crop_origin(298, 224), (37, 0));
        assert_eq!(crop_origin(33, 32), (0, 0));
        // 5 wide into 8: padded to 8 with ceil(3/2) = 2 before; the window starts at 0.
        assert_eq!(crop_origin(5, 8), (0, 2));
    }

    #[test]
    fn config_forms_parse_and_round_trip() {
        let p = ClipPreprocessor::from_json(&json!({"size": 36, "crop_size": 32, "resample": 3}))
            .unwrap();
        assert_eq!(p.resize, Some(ResizeTo::ShortestEdge(36)));
        assert_eq!(p.crop, Some((32, 32)));
        assert_eq!(ClipPreprocessor::from_json(&p.to_json()).unwrap(), p);
        let d = ClipPreprocessor::clip_default(224);
        assert_eq!(ClipPreprocessor::from_json(&d.to_json()).unwrap(), d);
        let err = ClipPreprocessor::from_json(&json!({"resample": 0})).unwrap_err();
        assert!(err.contains("resample 0"), "{err}");
    }

    #[test]
    fn a_white_image_normalises_to_one_minus_mean_over_std() {
        let image =
            DynamicImage::ImageRgb8(RgbImage::from_pixel(40, 30, image::Rgb([255, 255, 255])));
        let t = ClipPreprocessor::clip_default(16)
            .preprocess(&image)
            .unwrap();
        assert_eq!(t.size(), vec![3, 16, 16]);
        let expected =
            ((255.0f64 / 255.0) as f32 - OPENAI_CLIP_MEAN[1] as f32) / OPENAI_CLIP_STD[1] as f32;
        assert_eq!(t.double_value(&[1, 5, 5]) as f32, expected);
    }
}
