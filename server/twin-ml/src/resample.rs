//! Pillow's `Image.resize` for 8-bit RGB images, bit for bit: the convolution filters of
//! `src/libImaging/Resample.c` (`ImagingResample`), which transformers' PIL image processors
//! (CLIP's, Qwen2.5-VL's slow one) call. Matching it exactly is what lets preprocessing agree with
//! the reference to the u8 level instead of "close".
//!
//! What "exactly" takes, all from Resample.c:
//! - coefficients computed in f64 per output pixel, the filter's support scaled by the
//!   downscale factor, normalised to sum 1, then turned into fixed point with
//!   `PRECISION_BITS` = 22 fractional bits, rounding half away from zero;
//! - two separable passes, horizontal first (over only the source rows the vertical pass will
//!   read) — except that Pillow 13 goes vertical first when the height shrinks by more than
//!   twice as many pixels as the width; each pass accumulates in `i32` from a half-unit bias
//!   and clips to u8, so the intermediate image is rounded to u8 between the passes;
//! - a pass is skipped when its dimension does not change.

/// Pillow's resampling filters (the numbers are `PIL.Image.Resampling`'s, as stored in
/// `preprocessor_config.json`'s `resample`). `NEAREST` (0) is not a convolution and is not here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    /// The filter for a `PIL.Image.Resampling` number, `None` for NEAREST and unknown numbers.
    pub fn from_pil(code: i64) -> Option<Filter> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            4 => Some(Filter::Box),
            5 => Some(Filter::Hamming),
            _ => None,
        }
    }

    pub fn pil_code(self) -> i64 {
        match self {
            Filter::Lanczos => 1,
            Filter::Bilinear => 2,
            Filter::Bicubic => 3,
            Filter::Box => 4,
            Filter::Hamming => 5,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats (`0.54f`), so they are f32 values.
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Filter::Bicubic => {
                // Keys' cubic with a = -0.5, written as in Resample.c so the f64 rounding agrees.
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point coefficients of one pass: for output pixel `i`, source pixels
/// `first[i] .. first[i] + count[i]` weighted by `weights[i * taps ..]`.
struct Coefficients {
    taps: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i32>,
}

/// Resample.c's `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the whole source
/// range (Pillow's default box).
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let taps = support.ceil() as usize * 2 + 1;
    let mut first = Vec::with_capacity(out_size);
    let mut count = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * taps];
    let mut k = vec![0f64; taps];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filter_scale;
        // `(int)` in C truncates toward zero, as `as` does; the clamps follow.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.weight(((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * taps..xx * taps + taps];
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            row[x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        first.push(xmin);
        count.push(n);
    }
    Coefficients {
        taps,
        first,
        count,
        weights,
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    // Resample.c looks `acc >> PRECISION_BITS` up in a table that clamps to 0..=255.
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resizes a packed RGB8 image (`width * height * 3` bytes, rows top to bottom) to
/// `new_width × new_height` exactly as Pillow's `Image.resize(size, filter)` does for mode "RGB".
///
/// # Panics
/// If `pixels` is not `width * height * 3` bytes long or a size is zero.
pub fn resize_rgb8(
    pixels: &[u8],
    width: usize,
    height: usize,
    new_width: usize,
    new_height: usize,
    filter: Filter,
) -> Vec<u8> {
    assert_eq!(
        pixels.len(),
        width * height * 3,
        "pixels must be width * height * 3 bytes"
    );
    assert!(
        width > 0 && height > 0 && new_width > 0 && new_height > 0,
        "sizes must be positive"
    );
    let need_horizontal = new_width != width;
    let need_vertical = new_height != height;
    if need_horizontal
        && need_vertical
        && new_height < height
        && height - new_height > 2 * width.saturating_sub(new_width)
    {
        // Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height
        // shrinks by more than twice as many pixels as the width does; the u8 rounding between
        // the passes makes the order visible in the output.
        let vertical = coefficients(height, new_height, filter);
        let image = vertical_pass(pixels, width, 0, &vertical);
        let horizontal = coefficients(width, new_width, filter);
        return horizontal_pass(&image, width, 0, new_height, &horizontal);
    }
    let vertical = coefficients(height, new_height, filter);
    // The source rows the vertical pass reads; only these are resampled horizontally.
    let row_first = vertical.first[0];
    let row_last = vertical.first[new_height - 1] + vertical.count[new_height - 1];

    let (image, image_width, row_offset) = if need_horizontal {
        let c = coefficients(width, new_width, filter);
        let rows = row_last - row_first;
        (
            std::borrow::Cow::Owned(horizontal_pass(pixels, width, row_first, rows, &c)),
            new_width,
            row_first,
        )
    } else {
        (std::borrow::Cow::Borrowed(pixels), width, 0)
    };
    if !need_vertical {
        return image.into_owned();
    }
    vertical_pass(&image, image_width, row_offset, &vertical)
}

/// Resamples `rows` rows of `pixels` (packed RGB, `width` wide) starting at row `row_first`
/// along x with coefficients `c`.
fn horizontal_pass(
    pixels: &[u8],
    width: usize,
    row_first: usize,
    rows: usize,
    c: &Coefficients,
) -> Vec<u8> {
    let new_width = c.first.len();
    let mut out = vec![0u8; new_width * rows * 3];
    for y in 0..rows {
        let src = &pixels[(y + row_first) * width * 3..(y + row_first + 1) * width * 3];
        let dst = &mut out[y * new_width * 3..(y + 1) * new_width * 3];
        for xx in 0..new_width {
            let k = &c.weights[xx * c.taps..xx * c.taps + c.count[xx]];
            let base = c.first[xx] * 3;
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (x, &w) in k.iter().enumerate() {
                let p = base + x * 3;
                r += i32::from(src[p]) * w;
                g += i32::from(src[p + 1]) * w;
                b += i32::from(src[p + 2]) * w;
            }
            dst[xx * 3] = clip8(r);
            dst[xx * 3 + 1] = clip8(g);
            dst[xx * 3 + 2] = clip8(b);
        }
    }
    out
}

/// Resamples `image` (packed RGB, `width` wide, whose first row is source row `row_offset`)
/// along y with coefficients `vertical`.
fn vertical_pass(
    image: &[u8],
    width: usize,
    row_offset: usize,
    vertical: &Coefficients,
) -> Vec<u8> {
    let new_height = vertical.first.len();
    let stride = width * 3;
    let mut out = vec![0u8; stride * new_height];
    let mut acc = vec![0i32; stride];
    for yy in 0..new_height {
        // Row-at-a-time accumulation: the same sums in the same order as Resample.c's
        // per-pixel loop (integer addition is exact), but reading rows contiguously.
        acc.fill(HALF);
        let k = &vertical.weights[yy * vertical.taps..yy * vertical.taps + vertical.count[yy]];
        for (y, &w) in k.iter().enumerate() {
            let row = vertical.first[yy] + y - row_offset;
            let src = &image[row * stride..(row + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(src) {
                *a += i32::from(p) * w;
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy() {
        let pixels: Vec<u8> = (0..4 * 3 * 3).map(|v| v as u8).collect();
        assert_eq!(resize_rgb8(&pixels, 4, 3, 4, 3, Filter::Bicubic), pixels);
    }

    #[test]
    fn a_flat_image_stays_flat_in_both_directions() {
        let pixels = vec![200u8; 7 * 5 * 3];
        assert!(
            resize_rgb8(&pixels, 7, 5, 3, 11, Filter::Bicubic)
                .iter()
                .all(|&p| p == 200)
        );
        assert!(
            resize_rgb8(&pixels, 7, 5, 16, 2, Filter::Lanczos)
                .iter()
                .all(|&p| p == 200)
        );
    }

    #[test]
    fn matches_pillow_when_shrinking_one_axis_and_growing_the_other() {
        // Expected values from Pillow 13.0.0:
        //   a = np.arange(24, dtype=np.uint8).reshape(2, 4, 3) * 10
        //   Image.fromarray(a, "RGB").resize((3, 3), Image.BICUBIC)
        let ramp: Vec<u8> = (0..24u8).map(|v| v * 10).collect();
        let expected: [u8; 27] = [
            0, 8, 18, 37, 47, 57, 76, 86, 96, 66, 76, 86, 105, 115, 125, 144, 154, 164, 134, 144,
            154, 173, 183, 193, 212, 222, 232,
        ];
        assert_eq!(resize_rgb8(&ramp, 4, 2, 3, 3, Filter::Bicubic), expected);

        //   b = np.random.default_rng(5).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
        //   Image.fromarray(b, "RGB").resize((4, 9), Image.BICUBIC)  (overshoots, so clips)
        let noise: [u8; 105] = [
            168, 229, 184, 171, 238, 171, 20, 206, 245, 153, 204, 5, 37, 53, 213, 206, 192, 173, 6,
            120, 63, 96, 236, 131, 118, 4, 87, 161, 124, 71, 42, 73, 237, 16, 194, 250, 10, 103,
            206, 13, 143, 2, 38, 71, 133, 118, 36, 98, 196, 35, 57, 146, 50, 179, 145, 104, 206,
            53, 141, 33, 181, 39, 151, 11, 180, 138, 66, 0, 165, 98, 123, 12, 144, 184, 24, 38,
            129, 1, 202, 255, 85, 54, 228, 48, 127, 169, 1, 167, 109, 247, 16, 192, 78, 220, 8, 60,
            189, 181, 64, 72, 8, 185, 88, 111, 191,
        ];
        let expected: [u8; 108] = [
            171, 241, 194, 80, 225, 161, 114, 118, 136, 100, 150, 122, 152, 208, 164, 92, 178, 148,
            79, 128, 178, 67, 144, 113, 116, 144, 111, 118, 90, 122, 20, 145, 248, 12, 132, 96, 93,
            90, 101, 151, 46, 110, 59, 123, 232, 54, 101, 95, 75, 55, 113, 174, 35, 99, 125, 100,
            169, 123, 87, 97, 43, 70, 138, 140, 76, 60, 113, 144, 76, 129, 183, 70, 40, 102, 150,
            105, 116, 44, 108, 169, 18, 115, 232, 73, 109, 135, 126, 102, 122, 88, 159, 119, 57,
            89, 122, 154, 148, 152, 111, 103, 123, 113, 188, 89, 83, 75, 56, 200,
        ];
        assert_eq!(resize_rgb8(&noise, 7, 5, 4, 9, Filter::Bicubic), expected);
    }

    #[test]
    fn matches_pillow_when_growing_one_axis_and_shrinking_the_other() {
        //   a = np.random.default_rng(3).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
        //   Image.fromarray(a, "RGB").resize((6, 3), Image.BICUBIC)
        let source: [u8; 60] = [
            248, 194, 190, 207, 147, 26, 237, 21, 245, 211, 239, 45, 5, 157, 159, 60, 54, 236, 109,
            46, 199, 82, 32, 205, 36, 7, 134, 222, 57, 146, 8, 149, 14, 15, 22, 10, 144, 208, 24,
            24, 7, 41, 11, 85, 59, 104, 225, 110, 226, 201, 8, 159, 26, 27, 163, 122, 33, 41, 201,
            67,
        ];
        let expected: [u8; 54] = [
            143, 181, 185, 143, 150, 145, 152, 95, 130, 184, 32, 223, 173, 87, 175, 155, 155, 106,
            34, 81, 114, 92, 57, 138, 127, 49, 142, 33, 108, 71, 26, 90, 65, 47, 56, 80, 202, 217,
            9, 152, 111, 17, 96, 16, 29, 98, 89, 35, 81, 171, 62, 66, 224, 85,
        ];
        assert_eq!(resize_rgb8(&source, 4, 5, 6, 3, Filter::Bicubic), expected);
    }

    #[test]
    fn matches_pillow_when_the_height_shrinks_much_more_than_the_width() {
        // Vertical pass first (height −5 > 2 × width −1):
        //   a = np.random.default_rng(9).integers(0, 256, size=(9, 5, 3), dtype=np.uint8)
        //   Image.fromarray(a, "RGB").resize((4, 4), Image.BICUBIC)
        let source: [u8; 135] = [
            33, 135, 234, 107, 222, 166, 200, 222, 32, 4, 7, 246, 68, 218, 108, 73, 190, 163, 70,
            29, 203, 234, 103, 154, 248, 154, 226, 170, 65, 121, 12, 199, 133, 42, 131, 164, 187,
            170, 80, 183, 108, 27, 79, 234, 0, 90, 86, 234, 8, 202, 52, 237, 24, 194, 66, 220, 23,
            98, 148, 184, 10, 159, 17, 235, 172, 9, 88, 3, 42, 116, 206, 6, 156, 97, 50, 204, 36,
            124, 239, 111, 218, 239, 136, 191, 184, 79, 37, 124, 240, 132, 216, 230, 10, 242, 173,
            16, 59, 29, 115, 172, 119, 181, 112, 1, 0, 48, 232, 37, 67, 155, 163, 212, 46, 8, 227,
            74, 37, 178, 185, 251, 52, 186, 57, 89, 249, 48, 220, 200, 86, 49, 204, 245, 235, 99,
            203,
        ];
        let expected: [u8; 48] = [
            45, 160, 194, 135, 142, 145, 181, 117, 160, 115, 139, 120, 44, 148, 136, 122, 118, 105,
            158, 134, 61, 110, 172, 77, 180, 136, 67, 203, 109, 118, 155, 91, 91, 137, 132, 74, 81,
            219, 51, 139, 159, 75, 168, 116, 110, 179, 121, 187,
        ];
        assert_eq!(resize_rgb8(&source, 5, 9, 4, 4, Filter::Bicubic), expected);
    }
}
