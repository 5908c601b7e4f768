//! Procedural sample data: product-like images whose instances differ from their category's base
//! design in one hard detail, each seen from several views.
//!
//! A *category* (mug, sneaker, lamp, …) is a parametric drawing: a list of [`Param`]s (a part's
//! size, a part's shape, a part's colour, a marking) and a function that turns their values into
//! coloured parts. The category's *base design* samples every parameter; instance 0 is the base
//! itself and every other instance changes exactly one parameter of it, so siblings look alike
//! and differ in one or two details: the hard negatives that mining has to find. `instances.jsonl`
//! records, per instance, the base it varies and what it changed. Each *view* re-poses (rotation,
//! mirror, scale, shear, mild perspective), re-lights (brightness, colour cast, gradient) and
//! re-backgrounds (solid, gradient, stripes, checker, clutter) the instance.
//!
//! Reproducibility: everything random comes from a [`Stream`] derived from the seed and the
//! names involved (category; category and instance; category, instance and view), never from a
//! shared generator, so an image does not depend on which others were generated or in which
//! order. The generator is a SplitMix64 of our own rather than rand's `StdRng`, whose algorithm
//! rand reserves the right to change, so a seed names the same images across dependency updates.
//!
//! Rendering evaluates 3×3 samples per pixel and averages them (anti-aliasing); shapes are
//! tested analytically in object coordinates, so the same scene renders at any size.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ImageEncoder, Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::import::ManifestLine;

/// Samples per pixel along each axis.
const SUPERSAMPLE: u32 = 3;
/// The instance directory that `--corrupt` files go to, under the first category.
pub const CORRUPT_INSTANCE: &str = "broken";

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthConfig {
    /// Number of categories; past the built-in kinds they repeat with new base designs
    /// (`mug-2`, `sneaker-2`, …).
    pub categories: usize,
    pub instances: usize,
    pub views: usize,
    /// Width and height of each image in pixels.
    pub size: u32,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            categories: 6,
            instances: 4,
            views: 4,
            size: 224,
            seed: 42,
        }
    }
}

impl SynthConfig {
    pub const MIN_SIZE: u32 = 16;
    pub const MAX_SIZE: u32 = 2048;

    pub fn validate(&self) -> Result<(), SynthError> {
        for (name, value) in [
            ("categories", self.categories),
            ("instances", self.instances),
            ("views", self.views),
        ] {
            if value == 0 {
                return Err(SynthError::Config(format!("{name} must be at least 1")));
            }
        }
        if !(Self::MIN_SIZE..=Self::MAX_SIZE).contains(&self.size) {
            return Err(SynthError::Config(format!(
                "size must be {} to {} pixels, not {}",
                Self::MIN_SIZE,
                Self::MAX_SIZE,
                self.size
            )));
        }
        Ok(())
    }
}

/// Why generation failed; the underlying error is part of the message (`cause`), not a
/// `source()`, so a caller printing the chain shows it once.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("invalid sample config: {0}")]
    Config(String),
    #[error("cannot write {}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot encode {}: {cause}", path.display())]
    Encode {
        path: PathBuf,
        cause: image::ImageError,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |cause| SynthError::Io {
        path: path.to_owned(),
        cause,
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness

/// SplitMix64 (Steele, Lea & Flood 2014): small, fast, and fixed here for good.
#[derive(Debug, Clone)]
pub struct Stream(u64);

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Stream {
    /// The stream for `names` under `seed`: FNV-1a over the names (each closed by a byte no
    /// UTF-8 text contains, so `["ab", "c"]` and `["a", "bc"]` differ), mixed with the seed.
    pub fn derive(seed: u64, names: &[&str]) -> Stream {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ splitmix(seed);
        for name in names {
            for b in name.bytes().chain([0xff]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        Stream(splitmix(h))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix(self.0)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in 0..n (n > 0); the modulo bias is below 2⁻⁵⁰ for the small n used here.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, p: f32) -> bool {
        self.unit() < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// Geometry and colour

#[derive(Debug, Clone, Copy, PartialEq)]
struct V2 {
    x: f32,
    y: f32,
}

const fn v2(x: f32, y: f32) -> V2 {
    V2 { x, y }
}

impl V2 {
    fn length(self) -> f32 {
        (self.x * self.x + self.y * self.y).sqrt()
    }
    fn dot(self, o: V2) -> f32 {
        self.x * o.x + self.y * o.y
    }
    fn sub(self, o: V2) -> V2 {
        v2(self.x - o.x, self.y - o.y)
    }
}

/// An axis-aligned box; used to skip parts a sample cannot hit.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bounds {
    min: V2,
    max: V2,
}

impl Bounds {
    const EMPTY: Bounds = Bounds {
        min: v2(f32::INFINITY, f32::INFINITY),
        max: v2(f32::NEG_INFINITY, f32::NEG_INFINITY),
    };

    fn around(centre: V2, half: V2) -> Bounds {
        Bounds {
            min: v2(centre.x - half.x, centre.y - half.y),
            max: v2(centre.x + half.x, centre.y + half.y),
        }
    }

    fn contains(&self, q: V2) -> bool {
        q.x >= self.min.x && q.x <= self.max.x && q.y >= self.min.y && q.y <= self.max.y
    }

    fn intersection(self, o: Bounds) -> Bounds {
        Bounds {
            min: v2(self.min.x.max(o.min.x), self.min.y.max(o.min.y)),
            max: v2(self.max.x.min(o.max.x), self.max.y.min(o.max.y)),
        }
    }

    fn union(self, o: Bounds) -> Bounds {
        Bounds {
            min: v2(self.min.x.min(o.min.x), self.min.y.min(o.min.y)),
            max: v2(self.max.x.max(o.max.x), self.max.y.max(o.max.y)),
        }
    }

    fn width(&self) -> f32 {
        self.max.x - self.min.x
    }
}

/// Which part of a ring is kept: handles are half rings.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Keep {
    Right,
    Top,
}

/// A filled region in object coordinates (x right, y down; objects fit in about [-0.9, 0.9]²).
#[derive(Debug, Clone, PartialEq)]
enum Shape {
    Ellipse {
        centre: V2,
        radii: V2,
    },
    Rect {
        centre: V2,
        half: V2,
        round: f32,
    },
    Capsule {
        from: V2,
        to: V2,
        radius: f32,
    },
    /// An elliptical band of the given thickness (a handle).
    Ring {
        centre: V2,
        radii: V2,
        thickness: f32,
        keep: Keep,
    },
    /// Even-odd filled.
    Polygon(Vec<V2>),
}

fn ellipse(centre: V2, radii: V2) -> Shape {
    Shape::Ellipse { centre, radii }
}

fn capsule(from: V2, to: V2, radius: f32) -> Shape {
    Shape::Capsule { from, to, radius }
}

fn ring(centre: V2, radii: V2, thickness: f32, keep: Keep) -> Shape {
    Shape::Ring {
        centre,
        radii,
        thickness,
        keep,
    }
}

impl Shape {
    fn rect(centre: V2, half: V2) -> Shape {
        Shape::Rect {
            centre,
            half,
            round: 0.0,
        }
    }

    fn rounded(centre: V2, half: V2, round: f32) -> Shape {
        Shape::Rect {
            centre,
            half,
            round: round.min(half.x).min(half.y),
        }
    }

    fn contains(&self, q: V2) -> bool {
        match self {
            Shape::Ellipse { centre, radii } => {
                let d = q.sub(*centre);
                let (nx, ny) = (d.x / radii.x, d.y / radii.y);
                nx * nx + ny * ny <= 1.0
            }
            Shape::Rect {
                centre,
                half,
                round,
            } => {
                let (dx, dy) = ((q.x - centre.x).abs(), (q.y - centre.y).abs());
                if dx > half.x || dy > half.y {
                    return false;
                }
                let (ex, ey) = (dx - (half.x - round), dy - (half.y - round));
                ex <= 0.0 || ey <= 0.0 || ex * ex + ey * ey <= round * round
            }
            Shape::Capsule { from, to, radius } => {
                let ab = to.sub(*from);
                let aq = q.sub(*from);
                let len2 = ab.dot(ab);
                let t = if len2 > 0.0 {
                    (aq.dot(ab) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let nearest = v2(from.x + ab.x * t, from.y + ab.y * t);
                q.sub(nearest).length() <= *radius
            }
            Shape::Ring {
                centre,
                radii,
                thickness,
                keep,
            } => {
                let kept = match keep {
                    Keep::Right => q.x >= centre.x,
                    Keep::Top => q.y <= centre.y,
                };
                if !kept {
                    return false;
                }
                let d = q.sub(*centre);
                let e = ((d.x / radii.x).powi(2) + (d.y / radii.y).powi(2)).sqrt();
                if e == 0.0 {
                    return false;
                }
                // Radial distance to the ellipse, exact on circles and close enough on the
                // mildly elliptical handles drawn here.
                (d.length() * (1.0 - 1.0 / e)).abs() <= thickness / 2.0
            }
            Shape::Polygon(points) => {
                let mut inside = false;
                let mut j = points.len() - 1;
                for i in 0..points.len() {
                    let (a, b) = (points[i], points[j]);
                    if (a.y > q.y) != (b.y > q.y)
                        && q.x < (b.x - a.x) * (q.y - a.y) / (b.y - a.y) + a.x
                    {
                        inside = !inside;
                    }
                    j = i;
                }
                inside
            }
        }
    }

    fn bounds(&self) -> Bounds {
        match self {
            Shape::Ellipse { centre, radii } => Bounds::around(*centre, *radii),
            Shape::Rect { centre, half, .. } => Bounds::around(*centre, *half),
            Shape::Capsule { from, to, radius } => Bounds::around(*from, v2(*radius, *radius))
                .union(Bounds::around(*to, v2(*radius, *radius))),
            Shape::Ring {
                centre,
                radii,
                thickness,
                ..
            } => Bounds::around(*centre, v2(radii.x + thickness, radii.y + thickness)),
            Shape::Polygon(points) => points
                .iter()
                .fold(Bounds::EMPTY, |b, p| b.union(Bounds { min: *p, max: *p })),
        }
    }
}

/// Linear-ish sRGB in [0, 1].
type Colour = [f32; 3];

const fn hex(rgb: u32) -> Colour {
    [
        ((rgb >> 16) & 0xff) as f32 / 255.0,
        ((rgb >> 8) & 0xff) as f32 / 255.0,
        (rgb & 0xff) as f32 / 255.0,
    ]
}

fn hex_string(c: Colour) -> String {
    let [r, g, b] = c.map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8);
    format!("#{r:02x}{g:02x}{b:02x}")
}

fn scaled(c: Colour, f: f32) -> Colour {
    c.map(|v| (v * f).clamp(0.0, 1.0))
}

fn mixed(a: Colour, b: Colour, t: f32) -> Colour {
    [0, 1, 2].map(|k| a[k] + (b[k] - a[k]) * t)
}

fn distance(a: Colour, b: Colour) -> f32 {
    [0, 1, 2]
        .map(|k| (a[k] - b[k]).powi(2))
        .iter()
        .sum::<f32>()
        .sqrt()
}

fn to_hsv(c: Colour) -> (f32, f32, f32) {
    let max = c[0].max(c[1]).max(c[2]);
    let min = c[0].min(c[1]).min(c[2]);
    let delta = max - min;
    let hue = if delta == 0.0 {
        0.0
    } else if max == c[0] {
        60.0 * ((c[1] - c[2]) / delta).rem_euclid(6.0)
    } else if max == c[1] {
        60.0 * ((c[2] - c[0]) / delta + 2.0)
    } else {
        60.0 * ((c[0] - c[1]) / delta + 4.0)
    };
    let saturation = if max == 0.0 { 0.0 } else { delta / max };
    (hue, saturation, max)
}

fn from_hsv(h: f32, s: f32, v: f32) -> Colour {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

/// Saturated product colours.
const BOLD: &[Colour] = &[
    hex(0xc0392b),
    hex(0x1f4e8c),
    hex(0x2e7d4f),
    hex(0xe1a21b),
    hex(0x16a085),
    hex(0xd35400),
    hex(0x8e44ad),
    hex(0xe84a7f),
    hex(0x34495e),
    hex(0x5dade2),
    hex(0x7b241c),
    hex(0x9acd32),
];
/// Whites, greys, blacks, beiges.
const NEUTRAL: &[Colour] = &[
    hex(0xf4f4f0),
    hex(0xe8e0cc),
    hex(0xb9b9b9),
    hex(0x6b6b6b),
    hex(0x2b2b2b),
    hex(0xd8c3a0),
    hex(0xc49a6c),
];
/// Wood and leather tones.
const WOOD: &[Colour] = &[
    hex(0xa0703c),
    hex(0x6e4523),
    hex(0xc9a26b),
    hex(0x3b2a1e),
    hex(0xe9dcc4),
];
/// Metal finishes.
const METAL: &[Colour] = &[
    hex(0xc7c9cc),
    hex(0xb08d3c),
    hex(0x303133),
    hex(0xb87333),
    hex(0xeeeeee),
];
/// Any of the above, for markings.
const MARK_COLOURS: &[Colour] = &[
    hex(0xc0392b),
    hex(0x1f4e8c),
    hex(0xe1a21b),
    hex(0xf4f4f0),
    hex(0x2b2b2b),
    hex(0x16a085),
    hex(0xe84a7f),
    hex(0xd35400),
];

// ---------------------------------------------------------------------------------------------
// Parts

/// How a part is shaded across its width: a painted cylinder or a flat decal.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Finish {
    Flat,
    Cylinder,
}

#[derive(Debug, Clone, PartialEq)]
struct Part {
    shape: Shape,
    bounds: Bounds,
    /// Drawn only where this also holds (a stripe on a body).
    clip: Option<Shape>,
    /// The box shading is measured across: the clip's, so a stripe shades like its body.
    light_bounds: Bounds,
    colour: Colour,
    finish: Finish,
    alpha: f32,
}

impl Part {
    fn new(shape: Shape, colour: Colour) -> Part {
        let bounds = shape.bounds();
        Part {
            shape,
            bounds,
            clip: None,
            light_bounds: bounds,
            colour,
            finish: Finish::Cylinder,
            alpha: 1.0,
        }
    }

    fn flat(mut self) -> Part {
        self.finish = Finish::Flat;
        self
    }

    fn clipped(mut self, clip: Shape) -> Part {
        let clip_bounds = clip.bounds();
        self.bounds = self.bounds.intersection(clip_bounds);
        self.light_bounds = clip_bounds;
        self.clip = Some(clip);
        self
    }

    fn alpha(mut self, alpha: f32) -> Part {
        self.alpha = alpha;
        self
    }

    fn covers(&self, q: V2) -> bool {
        self.bounds.contains(q)
            && self.shape.contains(q)
            && self.clip.as_ref().is_none_or(|c| c.contains(q))
    }

    /// The part's colour at `q`, blended over `under`.
    fn paint(&self, q: V2, under: Colour) -> Colour {
        let colour = match self.finish {
            Finish::Flat => self.colour,
            Finish::Cylinder => {
                let b = self.light_bounds;
                let u = ((q.x - b.min.x) / b.width().max(1e-6)).clamp(0.0, 1.0);
                // Brightest a third of the way across, darker towards both edges, with a narrow
                // highlight: a cylinder lit from the upper left.
                let body = 0.7 + 0.42 * (1.0 - ((u - 0.36) / 0.64).powi(2)).max(0.0);
                let highlight = 0.22 * (-((u - 0.27) / 0.05).powi(2)).exp();
                mixed(scaled(self.colour, body), [1.0; 3], highlight)
            }
        };
        mixed(under, colour, self.alpha)
    }
}

fn band(y: f32, half_height: f32, colour: Colour, on: &Shape) -> Part {
    let b = on.bounds();
    Part::new(
        Shape::rect(v2((b.min.x + b.max.x) / 2.0, y), v2(b.width(), half_height)),
        colour,
    )
    .clipped(on.clone())
}

const LOGO_SHAPES: &[&str] = &["circle", "diamond", "triangle"];
const STRIPE_STYLES: &[&str] = &["single", "double", "thick"];
const LABEL_STYLES: &[&str] = &["plain", "bordered", "split"];

fn logo(centre: V2, radius: f32, mark: &Mark) -> Part {
    let (c, r) = (centre, radius);
    let shape = match mark.variant % LOGO_SHAPES.len() {
        0 => ellipse(c, v2(r, r)),
        1 => Shape::Polygon(vec![
            v2(c.x, c.y - r),
            v2(c.x + r, c.y),
            v2(c.x, c.y + r),
            v2(c.x - r, c.y),
        ]),
        _ => Shape::Polygon(vec![
            v2(c.x, c.y - r),
            v2(c.x + r, c.y + r * 0.8),
            v2(c.x - r, c.y + r * 0.8),
        ]),
    };
    Part::new(shape, mark.colour).flat()
}

/// Horizontal stripes across `on` between `top` and `bottom`, placed by the mark.
fn stripes(top: f32, bottom: f32, mark: &Mark, on: &Shape) -> Vec<Part> {
    let y = top + (bottom - top) * (0.15 + 0.7 * mark.at);
    match mark.variant % STRIPE_STYLES.len() {
        0 => vec![band(y, 0.035, mark.colour, on)],
        1 => vec![
            band(y - 0.05, 0.022, mark.colour, on),
            band(y + 0.05, 0.022, mark.colour, on),
        ],
        _ => vec![band(y, 0.07, mark.colour, on)],
    }
}

/// A rectangular label across `on` between `top` and `bottom`, placed by the mark.
fn label(top: f32, bottom: f32, half_height: f32, mark: &Mark, on: &Shape) -> Vec<Part> {
    let y = top + half_height + (bottom - top - 2.0 * half_height) * mark.at;
    let main = band(y, half_height, mark.colour, on);
    match mark.variant % LABEL_STYLES.len() {
        0 => vec![main],
        1 => {
            let border = scaled(mark.colour, 0.45);
            vec![
                band(y, half_height, border, on),
                band(y, half_height * 0.72, mark.colour, on),
            ]
        }
        _ => vec![
            main,
            band(
                y + half_height * 0.5,
                half_height * 0.5,
                mixed(mark.colour, [1.0; 3], 0.6),
                on,
            ),
        ],
    }
}

// ---------------------------------------------------------------------------------------------
// Designs

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkKind {
    Logo,
    Stripe,
    Label,
}

impl MarkKind {
    fn styles(self) -> &'static [&'static str] {
        match self {
            MarkKind::Logo => LOGO_SHAPES,
            MarkKind::Stripe => STRIPE_STYLES,
            MarkKind::Label => LABEL_STYLES,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MarkKind::Logo => "logo",
            MarkKind::Stripe => "stripe",
            MarkKind::Label => "label",
        }
    }
}

/// One tunable property of a category; `key` is `<part>.<property>`.
#[derive(Debug, Clone, Copy)]
enum Param {
    /// A length, in object units.
    Size {
        key: &'static str,
        min: f32,
        max: f32,
    },
    /// A shape chosen among named options.
    Style {
        key: &'static str,
        options: &'static [&'static str],
    },
    Colour {
        key: &'static str,
        palette: &'static [Colour],
    },
    /// A logo, stripe or label that may be absent, placed at a height along its part.
    Mark { key: &'static str, kind: MarkKind },
}

impl Param {
    fn key(&self) -> &'static str {
        match self {
            Param::Size { key, .. }
            | Param::Style { key, .. }
            | Param::Colour { key, .. }
            | Param::Mark { key, .. } => key,
        }
    }

    fn difference_kind(&self) -> DifferenceKind {
        match self {
            Param::Size { .. } | Param::Style { .. } => DifferenceKind::Geometry,
            Param::Colour { .. } => DifferenceKind::Colour,
            Param::Mark { .. } => DifferenceKind::Marking,
        }
    }

    fn sample(&self, rng: &mut Stream) -> Value {
        match *self {
            Param::Size { min, max, .. } => Value::Size(rng.range(min, max)),
            Param::Style { options, .. } => Value::Style(rng.below(options.len())),
            Param::Colour { palette, .. } => Value::Colour(rng.pick(palette)),
            Param::Mark { kind, .. } => {
                Value::Mark(rng.chance(0.6).then(|| Mark::sample(kind, rng)))
            }
        }
    }

    fn describe(&self, value: &Value) -> String {
        match (self, value) {
            (Param::Size { .. }, Value::Size(s)) => format!("{s:.3}"),
            (Param::Style { options, .. }, Value::Style(i)) => options[*i].to_owned(),
            (Param::Colour { .. }, Value::Colour(c)) => hex_string(*c),
            (Param::Mark { .. }, Value::Mark(None)) => "absent".to_owned(),
            (Param::Mark { kind, .. }, Value::Mark(Some(m))) => format!(
                "{} {} at {:.2} in {}",
                kind.styles()[m.variant % kind.styles().len()],
                kind.name(),
                m.at,
                hex_string(m.colour)
            ),
            _ => unreachable!("a design's values are sampled from its own params"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Mark {
    /// 0 = top of the region the part allows, 1 = bottom. Markings move vertically only, since a
    /// mirrored view would turn a left/right move into no difference at all.
    at: f32,
    colour: Colour,
    variant: usize,
}

impl Mark {
    fn sample(kind: MarkKind, rng: &mut Stream) -> Mark {
        Mark {
            at: rng.range(0.0, 1.0),
            colour: rng.pick(MARK_COLOURS),
            variant: rng.below(kind.styles().len()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Value {
    Size(f32),
    Style(usize),
    Colour(Colour),
    Mark(Option<Mark>),
}

/// The drawable kinds, in the order categories are assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mug,
    Sneaker,
    Lamp,
    Backpack,
    Kettle,
    Bottle,
    Chair,
}

const KINDS: [Kind; 7] = [
    Kind::Mug,
    Kind::Sneaker,
    Kind::Lamp,
    Kind::Backpack,
    Kind::Kettle,
    Kind::Bottle,
    Kind::Chair,
];

/// The built-in category kinds, in the order `categories` takes them.
pub fn category_kinds() -> Vec<&'static str> {
    KINDS.iter().map(|k| k.name()).collect()
}

/// The name of category `index`: the kinds in order, then again with a new base design
/// (`mug-2`, …).
pub fn category_name(index: usize) -> String {
    let kind = KINDS[index % KINDS.len()];
    match index / KINDS.len() {
        0 => kind.name().to_owned(),
        round => format!("{}-{}", kind.name(), round + 1),
    }
}

// Short constructors, so each category's table reads one param a line.
const fn size(key: &'static str, min: f32, max: f32) -> Param {
    Param::Size { key, min, max }
}

const fn style(key: &'static str, options: &'static [&'static str]) -> Param {
    Param::Style { key, options }
}

const fn colour(key: &'static str, palette: &'static [Colour]) -> Param {
    Param::Colour { key, palette }
}

const fn mark(key: &'static str, kind: MarkKind) -> Param {
    Param::Mark { key, kind }
}

const MUG: &[Param] = &[
    size("body.width", 0.36, 0.5),
    size("body.height", 0.48, 0.64),
    colour("body.colour", BOLD),
    colour("rim.colour", NEUTRAL),
    style("handle.shape", &["round", "square", "tall", "small"]),
    size("handle.thickness", 0.06, 0.12),
    mark("body.logo", MarkKind::Logo),
    mark("body.stripe", MarkKind::Stripe),
];

const SNEAKER: &[Param] = &[
    colour("upper.colour", BOLD),
    colour("sole.colour", NEUTRAL),
    size("sole.thickness", 0.07, 0.15),
    style("toe.shape", &["round", "pointed", "square"]),
    size("collar.height", 0.05, 0.25),
    colour("heel.colour", NEUTRAL),
    colour("laces.colour", NEUTRAL),
    mark("side.stripe", MarkKind::Stripe),
];

const LAMP: &[Param] = &[
    style("base.shape", &["disc", "square", "dome"]),
    colour("base.colour", METAL),
    size("stem.height", 0.3, 0.6),
    style("shade.shape", &["cone", "drum", "bell"]),
    colour("shade.colour", BOLD),
    size("shade.width", 0.38, 0.58),
    mark("shade.band", MarkKind::Stripe),
];

const BACKPACK: &[Param] = &[
    colour("body.colour", BOLD),
    size("body.height", 0.56, 0.74),
    colour("pocket.colour", BOLD),
    size("pocket.height", 0.14, 0.3),
    style("pocket.shape", &["square", "rounded", "flap"]),
    colour("strap.colour", NEUTRAL),
    style("handle.shape", &["loop", "bar"]),
    mark("body.patch", MarkKind::Logo),
];

const KETTLE: &[Param] = &[
    style("body.shape", &["round", "conical", "tall"]),
    colour("body.colour", METAL),
    size("spout.length", 0.22, 0.42),
    size("lid.height", 0.05, 0.14),
    colour("knob.colour", NEUTRAL),
    style("handle.shape", &["arch", "side"]),
    mark("body.badge", MarkKind::Logo),
];

const BOTTLE: &[Param] = &[
    colour("body.colour", BOLD),
    size("body.width", 0.22, 0.34),
    style("shoulder.shape", &["sloped", "round", "square"]),
    size("neck.length", 0.1, 0.28),
    colour("cap.colour", NEUTRAL),
    size("cap.height", 0.07, 0.15),
    mark("body.label", MarkKind::Label),
    mark("body.logo", MarkKind::Logo),
];

const CHAIR: &[Param] = &[
    colour("seat.colour", BOLD),
    colour("frame.colour", WOOD),
    style("back.shape", &["solid", "slats", "round", "ladder"]),
    size("back.height", 0.45, 0.7),
    size("leg.splay", 0.0, 0.14),
    size("seat.thickness", 0.05, 0.11),
    mark("back.stripe", MarkKind::Stripe),
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Mug => "mug",
            Kind::Sneaker => "sneaker",
            Kind::Lamp => "lamp",
            Kind::Backpack => "backpack",
            Kind::Kettle => "kettle",
            Kind::Bottle => "bottle",
            Kind::Chair => "chair",
        }
    }

    fn params(self) -> &'static [Param] {
        match self {
            Kind::Mug => MUG,
            Kind::Sneaker => SNEAKER,
            Kind::Lamp => LAMP,
            Kind::Backpack => BACKPACK,
            Kind::Kettle => KETTLE,
            Kind::Bottle => BOTTLE,
            Kind::Chair => CHAIR,
        }
    }

    fn draw(self, d: &Design) -> Vec<Part> {
        match self {
            Kind::Mug => draw_mug(d),
            Kind::Sneaker => draw_sneaker(d),
            Kind::Lamp => draw_lamp(d),
            Kind::Backpack => draw_backpack(d),
            Kind::Kettle => draw_kettle(d),
            Kind::Bottle => draw_bottle(d),
            Kind::Chair => draw_chair(d),
        }
    }
}

/// Parameter values for one kind, in the order of its params.
#[derive(Debug, Clone, PartialEq)]
pub struct Design {
    kind: Kind,
    values: Vec<Value>,
}

impl Design {
    fn sample(kind: Kind, rng: &mut Stream) -> Design {
        let mut values: Vec<Value> = kind.params().iter().map(|p| p.sample(rng)).collect();
        // A marking the colour of what it sits on would be invisible, and its changes with it.
        for (i, param) in kind.params().iter().enumerate() {
            if let (Param::Mark { key, .. }, Value::Mark(Some(mut mark))) = (param, values[i]) {
                let part = key.split('.').next().unwrap_or_default();
                let under = kind
                    .params()
                    .iter()
                    .position(|p| p.key() == format!("{part}.colour"))
                    .and_then(|j| match values[j] {
                        Value::Colour(c) => Some(c),
                        _ => None,
                    });
                if let Some(under) = under {
                    while distance(mark.colour, under) < 0.35 {
                        mark.colour = rng.pick(MARK_COLOURS);
                    }
                    values[i] = Value::Mark(Some(mark));
                }
            }
        }
        Design { kind, values }
    }

    fn index(&self, key: &str) -> usize {
        self.kind
            .params()
            .iter()
            .position(|p| p.key() == key)
            .expect("drawing code names only its own category's params")
    }

    fn size(&self, key: &str) -> f32 {
        match self.values[self.index(key)] {
            Value::Size(s) => s,
            _ => unreachable!("{key} is declared as a size"),
        }
    }

    fn style(&self, key: &str) -> usize {
        match self.values[self.index(key)] {
            Value::Style(s) => s,
            _ => unreachable!("{key} is declared as a style"),
        }
    }

    fn colour(&self, key: &str) -> Colour {
        match self.values[self.index(key)] {
            Value::Colour(c) => c,
            _ => unreachable!("{key} is declared as a colour"),
        }
    }

    fn mark(&self, key: &str) -> Option<Mark> {
        match self.values[self.index(key)] {
            Value::Mark(m) => m,
            _ => unreachable!("{key} is declared as a mark"),
        }
    }

    /// Every parameter, described.
    pub fn describe(&self) -> BTreeMap<String, String> {
        self.kind
            .params()
            .iter()
            .zip(&self.values)
            .map(|(p, v)| (p.key().to_owned(), p.describe(v)))
            .collect()
    }

    /// The parts to draw, back to front, with a ground shadow first.
    fn parts(&self) -> Vec<Part> {
        let parts = self.kind.draw(self);
        let b = parts.iter().fold(Bounds::EMPTY, |b, p| b.union(p.bounds));
        let shadow = Part::new(
            ellipse(
                v2((b.min.x + b.max.x) / 2.0, b.max.y),
                v2(b.width() * 0.5, 0.06),
            ),
            [0.0; 3],
        )
        .flat()
        .alpha(0.25);
        std::iter::once(shadow).chain(parts).collect()
    }

    /// This design with param `index` changed, and what changed.
    fn vary(&self, index: usize, rng: &mut Stream) -> (Design, Difference) {
        let param = self.kind.params()[index];
        let old = self.values[index];
        let new = match (param, old) {
            (Param::Size { min, max, .. }, Value::Size(s)) => {
                // A third to a half of the range, towards the roomier side: noticeable side by
                // side, easy to miss across views.
                let delta = (max - min) * rng.range(0.35, 0.5);
                Value::Size(if s - min > max - s {
                    s - delta
                } else {
                    s + delta
                })
            }
            (Param::Style { options, .. }, Value::Style(i)) => {
                Value::Style((i + 1 + rng.below(options.len() - 1)) % options.len())
            }
            (Param::Colour { palette, .. }, Value::Colour(c)) => {
                Value::Colour(if rng.chance(0.4) {
                    subtle_shift(c, rng)
                } else {
                    let mut other = rng.pick(palette);
                    while distance(other, c) < 0.2 {
                        other = rng.pick(palette);
                    }
                    other
                })
            }
            (Param::Mark { kind, .. }, Value::Mark(None)) => {
                Value::Mark(Some(Mark::sample(kind, rng)))
            }
            (Param::Mark { .. }, Value::Mark(Some(mark))) => Value::Mark(if rng.chance(0.45) {
                None
            } else {
                let shift = rng.range(0.4, 0.6);
                Some(Mark {
                    at: if mark.at > 0.5 {
                        mark.at - shift
                    } else {
                        mark.at + shift
                    }
                    .clamp(0.0, 1.0),
                    ..mark
                })
            }),
            _ => unreachable!("a design's values are sampled from its own params"),
        };
        let mut design = self.clone();
        design.values[index] = new;
        let key = param.key();
        let difference = Difference {
            kind: param.difference_kind(),
            part: key.split('.').next().unwrap_or(key).to_owned(),
            property: key.to_owned(),
            from: param.describe(&old),
            to: param.describe(&new),
        };
        (design, difference)
    }
}

/// A hue turn of 12–22° (or, for greys, 10–16% lightness): the subtle colour variants.
fn subtle_shift(c: Colour, rng: &mut Stream) -> Colour {
    let (h, s, v) = to_hsv(c);
    let sign = if rng.chance(0.5) { 1.0 } else { -1.0 };
    if s < 0.15 {
        let f = rng.range(0.1, 0.16);
        let v = if v > 0.5 {
            v * (1.0 - f)
        } else {
            v * (1.0 + f) + 0.05
        };
        from_hsv(h, s, v.clamp(0.0, 1.0))
    } else {
        from_hsv(h + sign * rng.range(12.0, 22.0), s, v)
    }
}

// Category drawings. Object coordinates: x right, y down, the ground near y = 0.8.

fn draw_mug(d: &Design) -> Vec<Part> {
    let (bw, bh) = (d.size("body.width"), d.size("body.height"));
    let colour = d.colour("body.colour");
    let (cx, cy) = (-0.12, 0.8 - bh);
    let top = cy - bh;
    let body = Shape::rounded(v2(cx, cy), v2(bw, bh), 0.07);
    let t = d.size("handle.thickness");
    let hx = cx + bw - 0.03;
    let handle_colour = scaled(colour, 0.92);
    let mut parts = match d.style("handle.shape") {
        0 => vec![ring(v2(hx, cy - 0.05), v2(0.27, 0.28), t, Keep::Right)],
        1 => {
            let (x1, y0, y1) = (hx + 0.26, cy - 0.3, cy + 0.22);
            vec![
                capsule(v2(hx, y0), v2(x1, y0), t / 2.0),
                capsule(v2(x1, y0), v2(x1, y1), t / 2.0),
                capsule(v2(x1, y1), v2(hx, y1), t / 2.0),
            ]
        }
        2 => vec![ring(v2(hx, cy), v2(0.2, bh * 0.8), t, Keep::Right)],
        _ => vec![ring(v2(hx, top + 0.3), v2(0.15, 0.15), t, Keep::Right)],
    }
    .into_iter()
    .map(|s| Part::new(s, handle_colour).flat())
    .collect::<Vec<_>>();
    parts.push(Part::new(body.clone(), colour));
    parts.push(band(top + 0.08, 0.06, d.colour("rim.colour"), &body));
    parts.push(
        Part::new(
            ellipse(v2(cx, top + 0.02), v2(bw * 0.96, 0.07)),
            scaled(colour, 0.45),
        )
        .flat(),
    );
    if let Some(mark) = d.mark("body.stripe") {
        parts.extend(stripes(top + 0.2, cy + bh - 0.1, &mark, &body));
    }
    if let Some(mark) = d.mark("body.logo") {
        let y = top + 0.3 + (2.0 * bh - 0.55) * mark.at;
        parts.push(logo(v2(cx - 0.04, y), 0.11, &mark));
    }
    parts
}

fn draw_sneaker(d: &Design) -> Vec<Part> {
    let st = d.size("sole.thickness");
    let collar = d.size("collar.height");
    let upper = d.colour("upper.colour");
    let ground = 0.62;
    let y0 = ground - st;
    // The upper is clipped at the sole's top so rounded toes do not hang below it.
    let above_sole = Shape::rect(v2(0.0, y0 - 0.6), v2(1.0, 0.6));
    let mut parts = vec![
        Part::new(
            Shape::Polygon(vec![
                v2(0.05, y0),
                v2(0.1, y0 - 0.32),
                v2(0.42, y0 - 0.36 - collar),
                v2(0.8, y0 - 0.32 - collar),
                v2(0.86, y0),
            ]),
            upper,
        ),
        Part::new(
            Shape::Polygon(vec![
                v2(-0.45, y0),
                v2(-0.35, y0 - 0.28),
                v2(0.12, y0 - 0.4),
                v2(0.2, y0),
            ]),
            upper,
        ),
    ];
    let toe = match d.style("toe.shape") {
        0 => ellipse(v2(-0.38, y0), v2(0.5, 0.3)),
        1 => Shape::Polygon(vec![
            v2(-0.9, y0),
            v2(-0.45, y0 - 0.22),
            v2(-0.1, y0 - 0.32),
            v2(-0.1, y0),
        ]),
        _ => Shape::rounded(v2(-0.38, y0 - 0.13), v2(0.5, 0.14), 0.06),
    };
    parts.push(Part::new(toe, upper).clipped(above_sole));
    // Collar opening and heel tab.
    parts.push(
        Part::new(
            ellipse(v2(0.6, y0 - 0.33 - collar), v2(0.22, 0.045)),
            hex(0x1c1c1c),
        )
        .flat(),
    );
    parts.push(Part::new(
        Shape::rounded(
            v2(0.84, y0 - 0.16 - collar / 2.0),
            v2(0.07, 0.16 + collar / 2.0),
            0.04,
        ),
        d.colour("heel.colour"),
    ));
    let laces = d.colour("laces.colour");
    for k in 0..4 {
        let x = -0.22 + 0.1 * k as f32;
        let y = y0 - 0.3 - 0.02 * k as f32;
        parts.push(
            Part::new(
                capsule(v2(x - 0.05, y - 0.02), v2(x + 0.05, y + 0.02), 0.022),
                laces,
            )
            .flat(),
        );
    }
    if let Some(mark) = d.mark("side.stripe") {
        let rise = 0.05 + 0.15 * mark.at;
        let count = 1 + mark.variant % STRIPE_STYLES.len();
        for k in 0..count {
            let dy = 0.06 * k as f32;
            parts.push(
                Part::new(
                    capsule(
                        v2(-0.15, y0 - 0.07 - dy),
                        v2(0.6, y0 - 0.07 - rise - dy),
                        0.026,
                    ),
                    mark.colour,
                )
                .flat(),
            );
        }
    }
    parts.push(Part::new(
        Shape::rounded(v2(0.0, ground - st / 2.0), v2(0.9, st / 2.0), st / 2.0),
        d.colour("sole.colour"),
    ));
    parts
}

fn draw_lamp(d: &Design) -> Vec<Part> {
    let metal = d.colour("base.colour");
    let stem = d.size("stem.height");
    let w = d.size("shade.width");
    let shade_colour = d.colour("shade.colour");
    let base = match d.style("base.shape") {
        0 => ellipse(v2(0.0, 0.75), v2(0.3, 0.06)),
        1 => Shape::rounded(v2(0.0, 0.74), v2(0.24, 0.06), 0.02),
        _ => ellipse(v2(0.0, 0.8), v2(0.27, 0.17)),
    };
    let base_clip = Shape::rect(v2(0.0, 0.4), v2(1.0, 0.4));
    let bottom = 0.72 - stem;
    let top = bottom - 0.5;
    let shade = match d.style("shade.shape") {
        0 => Shape::Polygon(vec![
            v2(-w, bottom),
            v2(w, bottom),
            v2(w * 0.45, top),
            v2(-w * 0.45, top),
        ]),
        1 => Shape::rect(v2(0.0, (top + bottom) / 2.0), v2(w * 0.82, 0.25)),
        _ => {
            // A bell: the sides follow x = w(0.35 + 0.65 t²) from top (t = 0) to bottom (t = 1).
            let steps = 12;
            let right: Vec<V2> = (0..=steps)
                .map(|i| {
                    let t = i as f32 / steps as f32;
                    v2(w * (0.35 + 0.65 * t * t), top + (bottom - top) * t)
                })
                .collect();
            let left = right.iter().rev().map(|p| v2(-p.x, p.y));
            Shape::Polygon(right.iter().copied().chain(left).collect())
        }
    };
    let mut parts = vec![
        Part::new(capsule(v2(0.0, 0.74), v2(0.0, bottom - 0.1), 0.03), metal),
        Part::new(base, metal).clipped(base_clip),
        Part::new(shade.clone(), shade_colour),
        Part::new(ellipse(v2(0.0, bottom), v2(w * 0.78, 0.04)), hex(0xfff1c8)).flat(),
    ];
    if let Some(mark) = d.mark("shade.band") {
        parts.extend(stripes(top + 0.05, bottom - 0.05, &mark, &shade));
    }
    parts
}

fn draw_backpack(d: &Design) -> Vec<Part> {
    let bh = d.size("body.height");
    let colour = d.colour("body.colour");
    let strap = d.colour("strap.colour");
    let cy = 0.8 - bh;
    let top = cy - bh;
    let body = Shape::rounded(v2(0.0, cy), v2(0.45, bh), 0.2);
    let mut parts = Vec::new();
    for side in [-1.0f32, 1.0] {
        parts.push(Part::new(
            capsule(v2(side * 0.47, top + 0.22), v2(side * 0.52, 0.7), 0.055),
            strap,
        ));
    }
    parts.push(match d.style("handle.shape") {
        0 => Part::new(
            ring(v2(0.0, top + 0.03), v2(0.14, 0.13), 0.05, Keep::Top),
            strap,
        )
        .flat(),
        _ => Part::new(
            capsule(v2(-0.13, top - 0.06), v2(0.13, top - 0.06), 0.04),
            strap,
        ),
    });
    parts.push(Part::new(body.clone(), colour));
    let ph = d.size("pocket.height");
    let pocket_colour = d.colour("pocket.colour");
    let pc = v2(0.0, 0.8 - 0.1 - ph);
    let pocket = match d.style("pocket.shape") {
        0 => Shape::rounded(pc, v2(0.32, ph), 0.03),
        _ => Shape::rounded(pc, v2(0.32, ph), 0.12),
    };
    parts.push(Part::new(pocket.clone(), pocket_colour));
    if d.style("pocket.shape") == 2 {
        let y = pc.y - ph;
        parts.push(Part::new(
            Shape::Polygon(vec![
                v2(-0.34, y - 0.02),
                v2(0.34, y - 0.02),
                v2(0.0, y + 0.16),
            ]),
            scaled(pocket_colour, 0.8),
        ));
    } else {
        parts.push(band(pc.y - ph + 0.05, 0.012, hex(0x222222), &pocket));
    }
    if let Some(mark) = d.mark("body.patch") {
        let y = top + 0.25 + (pc.y - ph - top - 0.4).max(0.0) * mark.at;
        parts.push(logo(v2(0.0, y), 0.09, &mark));
    }
    parts
}

fn draw_kettle(d: &Design) -> Vec<Part> {
    let metal = d.colour("body.colour");
    let (body, body_top, half_width) = match d.style("body.shape") {
        0 => (ellipse(v2(0.0, 0.36), v2(0.46, 0.46)), -0.06, 0.46),
        1 => (
            Shape::Polygon(vec![
                v2(-0.5, 0.8),
                v2(0.5, 0.8),
                v2(0.28, -0.02),
                v2(-0.28, -0.02),
            ]),
            -0.02,
            0.5,
        ),
        _ => (
            Shape::rounded(v2(0.0, 0.36), v2(0.35, 0.45), 0.1),
            -0.09,
            0.35,
        ),
    };
    let flat_bottom = Shape::rect(v2(0.0, 0.0), v2(1.0, 0.8));
    let sl = d.size("spout.length");
    let spout = Shape::Polygon(vec![
        v2(-half_width * 0.6, 0.6),
        v2(-half_width * 0.6, 0.3),
        v2(-half_width * 0.6 - sl, 0.08),
        v2(-half_width * 0.6 - sl - 0.07, 0.12),
    ]);
    let lh = d.size("lid.height");
    let handle = match d.style("handle.shape") {
        0 => Part::new(
            ring(
                v2(0.0, body_top + 0.12),
                v2(0.34, 0.34 + lh),
                0.07,
                Keep::Top,
            ),
            hex(0x2b2b2b),
        ),
        _ => Part::new(
            ring(
                v2(half_width * 0.75, 0.32),
                v2(0.28, 0.3),
                0.08,
                Keep::Right,
            ),
            hex(0x2b2b2b),
        ),
    };
    let mut parts = vec![
        handle,
        Part::new(spout, scaled(metal, 0.9)),
        Part::new(body.clone(), metal).clipped(flat_bottom),
        Part::new(
            ellipse(v2(0.0, body_top), v2(0.28, lh)),
            scaled(metal, 0.85),
        ),
        Part::new(
            ellipse(v2(0.0, body_top - lh), v2(0.07, 0.06)),
            d.colour("knob.colour"),
        ),
    ];
    if let Some(mark) = d.mark("body.badge") {
        let y = body_top + 0.28 + 0.38 * mark.at;
        parts.push(logo(v2(0.05, y), 0.08, &mark));
    }
    parts
}

fn draw_bottle(d: &Design) -> Vec<Part> {
    let colour = d.colour("body.colour");
    let bw = d.size("body.width");
    let ground = 0.85;
    let body_top = -0.05;
    let body = Shape::rounded(
        v2(0.0, (ground + body_top) / 2.0),
        v2(bw, (ground - body_top) / 2.0),
        0.06,
    );
    let shoulder_top = -0.3;
    let shoulder = match d.style("shoulder.shape") {
        0 => Shape::Polygon(vec![
            v2(-bw, body_top + 0.01),
            v2(bw, body_top + 0.01),
            v2(0.1, shoulder_top),
            v2(-0.1, shoulder_top),
        ]),
        1 => ellipse(
            v2(0.0, body_top + 0.01),
            v2(bw, body_top + 0.01 - shoulder_top),
        ),
        _ => Shape::rounded(
            v2(0.0, (body_top + shoulder_top) / 2.0 + 0.06),
            v2(bw, 0.1),
            0.05,
        ),
    };
    let above_body = Shape::rect(v2(0.0, body_top - 0.5), v2(1.0, 0.51));
    let nl = d.size("neck.length");
    let ch = d.size("cap.height");
    let mut parts = vec![
        Part::new(
            Shape::rect(
                v2(0.0, shoulder_top - nl / 2.0 + 0.04),
                v2(0.09, nl / 2.0 + 0.04),
            ),
            colour,
        ),
        Part::new(shoulder, colour).clipped(above_body),
        Part::new(body.clone(), colour),
        Part::new(
            Shape::rounded(
                v2(0.0, shoulder_top - nl - ch / 2.0),
                v2(0.11, ch / 2.0),
                0.02,
            ),
            d.colour("cap.colour"),
        ),
    ];
    if let Some(mark) = d.mark("body.label") {
        parts.extend(label(body_top + 0.08, ground - 0.08, 0.14, &mark, &body));
    }
    if let Some(mark) = d.mark("body.logo") {
        let y = body_top + 0.15 + 0.55 * mark.at;
        parts.push(logo(v2(0.0, y), 0.07, &mark));
    }
    parts
}

fn draw_chair(d: &Design) -> Vec<Part> {
    let seat_colour = d.colour("seat.colour");
    let frame = d.colour("frame.colour");
    let back_h = d.size("back.height");
    let splay = d.size("leg.splay");
    let st = d.size("seat.thickness");
    let seat_y = 0.3;
    let back_bottom = seat_y - st;
    let back_top = back_bottom - back_h;
    let back_centre = v2(0.0, (back_top + back_bottom) / 2.0);
    let back_half = v2(0.4, back_h / 2.0);
    let mut parts = Vec::new();
    for side in [-1.0f32, 1.0] {
        // Back legs (darker, behind), then front legs.
        parts.push(Part::new(
            capsule(
                v2(side * 0.3, seat_y),
                v2(side * (0.3 + splay * 0.6), 0.78),
                0.03,
            ),
            scaled(frame, 0.7),
        ));
        parts.push(Part::new(
            capsule(
                v2(side * 0.42, seat_y),
                v2(side * (0.42 + splay), 0.85),
                0.035,
            ),
            frame,
        ));
        parts.push(Part::new(
            capsule(v2(side * 0.4, back_bottom), v2(side * 0.4, back_top), 0.035),
            frame,
        ));
    }
    let back = match d.style("back.shape") {
        0 => {
            let s = Shape::rounded(back_centre, back_half, 0.05);
            parts.push(Part::new(s.clone(), seat_colour));
            s
        }
        1 => {
            for k in 0..4 {
                let x = -0.27 + 0.18 * k as f32;
                parts.push(Part::new(
                    Shape::rect(v2(x, back_centre.y), v2(0.045, back_h / 2.0)),
                    frame,
                ));
            }
            parts.push(Part::new(
                Shape::rounded(v2(0.0, back_top + 0.05), v2(0.42, 0.06), 0.03),
                frame,
            ));
            Shape::rect(back_centre, back_half)
        }
        2 => {
            let s = ellipse(back_centre, v2(0.42, back_h / 2.0));
            parts.push(Part::new(s.clone(), seat_colour));
            s
        }
        _ => {
            for k in 0..3 {
                let y = back_top + 0.08 + (back_h - 0.16) * k as f32 / 2.0;
                parts.push(Part::new(capsule(v2(-0.4, y), v2(0.4, y), 0.035), frame));
            }
            Shape::rect(back_centre, back_half)
        }
    };
    if let Some(mark) = d.mark("back.stripe") {
        parts.extend(stripes(back_top + 0.05, back_bottom - 0.05, &mark, &back));
    }
    parts.push(Part::new(
        Shape::rounded(v2(0.0, seat_y), v2(0.5, st), 0.04),
        seat_colour,
    ));
    parts
}

// ---------------------------------------------------------------------------------------------
// Views

#[derive(Debug, Clone, PartialEq)]
struct Pose {
    rotation: f32,
    mirror: bool,
    scale: f32,
    shift: V2,
    shear: f32,
    /// Projective terms: a screen point s comes from a / (1 + perspective · a).
    perspective: V2,
}

impl Pose {
    /// The object point seen at screen point `s` (both in [-1, 1]², y down).
    fn to_object(&self, s: V2) -> V2 {
        let w = 1.0 / (1.0 - self.perspective.dot(s));
        let a = v2(s.x * w - self.shift.x, s.y * w - self.shift.y);
        let (sin, cos) = self.rotation.sin_cos();
        let r = v2(cos * a.x + sin * a.y, -sin * a.x + cos * a.y);
        let mirror = if self.mirror { -1.0 } else { 1.0 };
        let m = v2(r.x / self.scale * mirror, r.y / self.scale);
        v2(m.x - self.shear * m.y, m.y)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Light {
    brightness: f32,
    cast: Colour,
    /// Unit direction the light falls off along, and by how much across the frame.
    direction: V2,
    gradient: f32,
}

impl Light {
    fn apply(&self, s: V2, c: Colour) -> Colour {
        let f = self.brightness * (1.0 + self.gradient * 0.5 * self.direction.dot(s));
        [0, 1, 2].map(|k| c[k] * self.cast[k] * f)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Background {
    Solid(Colour),
    Gradient {
        from: Colour,
        to: Colour,
        direction: V2,
    },
    Stripes {
        a: Colour,
        b: Colour,
        direction: V2,
        period: f32,
    },
    Checker {
        a: Colour,
        b: Colour,
        cell: f32,
    },
    /// Out-of-focus things behind the object, in screen coordinates.
    Clutter {
        base: Colour,
        blobs: Vec<Part>,
    },
}

impl Background {
    fn at(&self, s: V2) -> Colour {
        match self {
            Background::Solid(c) => *c,
            Background::Gradient {
                from,
                to,
                direction,
            } => mixed(*from, *to, (direction.dot(s) * 0.5 + 0.5).clamp(0.0, 1.0)),
            Background::Stripes {
                a,
                b,
                direction,
                period,
            } => {
                if (direction.dot(s) / period).rem_euclid(1.0) < 0.5 {
                    *a
                } else {
                    *b
                }
            }
            Background::Checker { a, b, cell } => {
                let i = (s.x / cell).floor() as i64 + (s.y / cell).floor() as i64;
                if i.rem_euclid(2) == 0 { *a } else { *b }
            }
            Background::Clutter { base, blobs } => blobs
                .iter()
                .filter(|p| p.covers(s))
                .fold(*base, |c, p| p.paint(s, c)),
        }
    }
}

/// One view's pose, lighting and background; see [`PlannedInstance::views`].
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pose: Pose,
    light: Light,
    background: Background,
}

/// A muted background colour: low saturation, mid to high value.
fn backdrop(rng: &mut Stream) -> Colour {
    from_hsv(
        rng.range(0.0, 360.0),
        rng.range(0.0, 0.3),
        rng.range(0.55, 0.95),
    )
}

fn unit_direction(rng: &mut Stream) -> V2 {
    let a = rng.range(0.0, std::f32::consts::TAU);
    v2(a.cos(), a.sin())
}

impl View {
    fn sample(rng: &mut Stream) -> View {
        let pose = Pose {
            rotation: rng.range(-0.35, 0.35),
            mirror: rng.chance(0.5),
            scale: rng.range(0.72, 0.95),
            shift: v2(rng.range(-0.08, 0.08), rng.range(-0.08, 0.08)),
            shear: rng.range(-0.12, 0.12),
            perspective: v2(rng.range(-0.18, 0.18), rng.range(-0.18, 0.18)),
        };
        let light = Light {
            brightness: rng.range(0.8, 1.15),
            cast: [0; 3].map(|_| rng.range(0.92, 1.08)),
            direction: unit_direction(rng),
            gradient: rng.range(0.0, 0.35),
        };
        let base = backdrop(rng);
        let background = match rng.below(5) {
            0 => Background::Solid(base),
            1 => Background::Gradient {
                from: base,
                to: scaled(backdrop(rng), 0.85),
                direction: unit_direction(rng),
            },
            2 => Background::Stripes {
                a: base,
                b: scaled(base, rng.range(0.86, 0.94)),
                direction: unit_direction(rng),
                period: rng.range(0.15, 0.4),
            },
            3 => Background::Checker {
                a: base,
                b: scaled(base, rng.range(0.86, 0.94)),
                cell: rng.range(0.12, 0.3),
            },
            _ => {
                let blobs = (0..4 + rng.below(5))
                    .map(|_| {
                        let centre = v2(rng.range(-1.0, 1.0), rng.range(-1.0, 1.0));
                        let half = v2(rng.range(0.08, 0.35), rng.range(0.08, 0.35));
                        let shape = if rng.chance(0.5) {
                            Shape::Ellipse {
                                centre,
                                radii: half,
                            }
                        } else {
                            Shape::rounded(centre, half, 0.05)
                        };
                        Part::new(shape, backdrop(rng))
                            .flat()
                            .alpha(rng.range(0.4, 0.8))
                    })
                    .collect();
                Background::Clutter { base, blobs }
            }
        };
        View {
            pose,
            light,
            background,
        }
    }
}

/// Renders `design` seen through `view` as a `size`×`size` image.
pub fn render(design: &Design, view: &View, size: u32) -> RgbImage {
    let parts = design.parts();
    let object = parts.iter().fold(Bounds::EMPTY, |b, p| b.union(p.bounds));
    let n = size * SUPERSAMPLE;
    let mut sums = vec![[0f32; 3]; (size * size) as usize];
    for sy in 0..n {
        let y = (sy as f32 + 0.5) / n as f32 * 2.0 - 1.0;
        let row = (sy / SUPERSAMPLE * size) as usize;
        for sx in 0..n {
            let s = v2((sx as f32 + 0.5) / n as f32 * 2.0 - 1.0, y);
            let mut c = view.background.at(s);
            let q = view.pose.to_object(s);
            if object.contains(q) {
                for part in &parts {
                    if part.covers(q) {
                        c = part.paint(q, c);
                    }
                }
            }
            let c = view.light.apply(s, c);
            let sum = &mut sums[row + (sx / SUPERSAMPLE) as usize];
            for k in 0..3 {
                sum[k] += c[k];
            }
        }
    }
    let norm = 255.0 / (SUPERSAMPLE * SUPERSAMPLE) as f32;
    RgbImage::from_fn(size, size, |x, y| {
        let sum = sums[(y * size + x) as usize];
        Rgb(sum.map(|v| (v * norm).round().clamp(0.0, 255.0) as u8))
    })
}

// ---------------------------------------------------------------------------------------------
// Plans and records

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// A part's size or shape.
    Geometry,
    Colour,
    /// A logo, stripe or label added, removed or moved.
    Marking,
}

/// How an instance differs from its base design.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    pub kind: DifferenceKind,
    /// The part changed (`handle`).
    pub part: String,
    /// The parameter changed (`handle.shape`).
    pub property: String,
    pub from: String,
    pub to: String,
}

/// One line of `instances.jsonl`: the ground truth of which instances are hard negatives of
/// each other (every instance with the same `base`) and what tells them apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    pub category: String,
    pub instance: String,
    /// The base design this instance varies (the category's name: one base per category).
    pub base: String,
    /// What this instance changes in the base; `None` for the base itself. Two siblings differ
    /// in the union of their changes: one detail, or two.
    pub differs: Option<Difference>,
    /// Every parameter of this instance's design.
    pub design: BTreeMap<String, String>,
    /// The instance's images, relative to the output directory.
    pub views: Vec<String>,
}

/// An instance with everything needed to render it.
#[derive(Debug, Clone)]
pub struct PlannedInstance {
    pub record: InstanceRecord,
    pub design: Design,
    /// Pose, lighting and background of each view, in view order.
    pub views: Vec<View>,
}

pub fn instance_name(category: &str, index: usize) -> String {
    format!("{category}-{index:02}")
}

pub fn view_file(index: usize) -> String {
    format!("view-{index}.png")
}

/// Every instance of `config`, designed and posed but not rendered.
pub fn plan(config: &SynthConfig) -> Result<Vec<PlannedInstance>, SynthError> {
    config.validate()?;
    let mut planned = Vec::with_capacity(config.categories * config.instances);
    for c in 0..config.categories {
        let category = category_name(c);
        let kind = KINDS[c % KINDS.len()];
        let base = Design::sample(kind, &mut Stream::derive(config.seed, &[&category, "base"]));
        // Which param each instance changes: a per-category shuffle, walked in order, so the
        // first instances change different things.
        let mut order: Vec<usize> = (0..kind.params().len()).collect();
        let mut shuffle = Stream::derive(config.seed, &[&category, "order"]);
        for i in (1..order.len()).rev() {
            order.swap(i, shuffle.below(i + 1));
        }
        let mut siblings: Vec<Design> = vec![base.clone()];
        for i in 0..config.instances {
            let instance = instance_name(&category, i);
            let (design, differs) = if i == 0 {
                (base.clone(), None)
            } else {
                let mut rng = Stream::derive(config.seed, &[&category, &instance, "change"]);
                // A change that lands on an earlier sibling's design (two-option styles wrap
                // round quickly) moves on to the next param.
                let mut attempt = 0;
                loop {
                    let index = order[(i - 1 + attempt) % order.len()];
                    let (design, difference) = base.vary(index, &mut rng);
                    attempt += 1;
                    if !siblings.contains(&design) || attempt > 4 * order.len() {
                        break (design, Some(difference));
                    }
                }
            };
            siblings.push(design.clone());
            let views = (0..config.views)
                .map(|v| {
                    let name = v.to_string();
                    View::sample(&mut Stream::derive(
                        config.seed,
                        &[&category, &instance, "view", &name],
                    ))
                })
                .collect();
            let record = InstanceRecord {
                category: category.clone(),
                instance: instance.clone(),
                base: category.clone(),
                differs,
                design: design.describe(),
                views: (0..config.views)
                    .map(|v| format!("{category}/{instance}/{}", view_file(v)))
                    .collect(),
            };
            planned.push(PlannedInstance {
                record,
                design,
                views,
            });
        }
    }
    Ok(planned)
}

/// Runs `job` over `items` on every core, returning results in item order. Each image depends
/// only on its own item, so the schedule cannot change a byte of the output.
fn parallel_map<T: Sync, R: Send>(items: &[T], job: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len().max(1));
    let next = AtomicUsize::new(0);
    let results = Mutex::new((0..items.len()).map(|_| None).collect::<Vec<Option<R>>>());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    let r = job(item);
                    results
                        .lock()
                        .expect("no worker panics while holding the lock")[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("no worker panics while holding the lock")
        .into_iter()
        .map(|r| r.expect("every index is taken by exactly one worker"))
        .collect()
}

fn encode_png(image: &RgbImage, compression: CompressionType) -> Vec<u8> {
    let mut bytes = Vec::new();
    PngEncoder::new_with_quality(&mut bytes, compression, FilterType::Adaptive)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("encoding an in-memory RGB image to a Vec cannot fail");
    bytes
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    std::fs::write(path, bytes).map_err(io_error(path))
}

fn write_jsonl<T: Serialize>(path: &Path, lines: &[T]) -> Result<(), SynthError> {
    let mut out = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut out, line).expect("plain records always serialise");
        out.write_all(b"\n").expect("writing to a Vec cannot fail");
    }
    write_file(path, &out)
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleSummary {
    pub images: usize,
    pub instances: usize,
    pub categories: usize,
    pub corrupt: usize,
    /// `<out>/manifest.jsonl`, in ingest's format.
    pub manifest: PathBuf,
    /// `<out>/instances.jsonl`, one [`InstanceRecord`] a line.
    pub instances_file: PathBuf,
}

/// Writes `<out>/<category>/<instance>/view-<n>.png`, `<out>/manifest.jsonl` (the ingest
/// format: path, instance, category) and `<out>/instances.jsonl`, plus `corrupt` truncated PNGs
/// under `<out>/<first category>/broken/` (also in the manifest) for seeing ingest reject files.
pub fn generate(
    config: &SynthConfig,
    out: &Path,
    corrupt: usize,
) -> Result<SampleSummary, SynthError> {
    let planned = plan(config)?;
    let jobs: Vec<(&PlannedInstance, usize)> = planned
        .iter()
        .flat_map(|p| (0..p.views.len()).map(move |v| (p, v)))
        .collect();
    let written = parallel_map(&jobs, |(p, v)| {
        let image = render(&p.design, &p.views[*v], config.size);
        let path = out.join(&p.record.views[*v]);
        write_file(&path, &encode_png(&image, CompressionType::Default))
    });
    written.into_iter().collect::<Result<Vec<()>, _>>()?;

    let mut manifest: Vec<ManifestLine> = planned
        .iter()
        .flat_map(|p| {
            p.record.views.iter().map(|path| ManifestLine {
                path: path.clone(),
                instance: p.record.instance.clone(),
                category: p.record.category.clone(),
            })
        })
        .collect();
    let first = category_name(0);
    for k in 0..corrupt {
        let rel = format!("{first}/{CORRUPT_INSTANCE}/corrupt-{k}.png");
        let mut png = encode_png(&RgbImage::new(32, 32), CompressionType::Default);
        png.truncate(png.len() / 2);
        write_file(&out.join(&rel), &png)?;
        manifest.push(ManifestLine {
            path: rel,
            instance: CORRUPT_INSTANCE.to_owned(),
            category: first.clone(),
        });
    }
    let manifest_path = out.join("manifest.jsonl");
    write_jsonl(&manifest_path, &manifest)?;
    let instances_path = out.join("instances.jsonl");
    let records: Vec<&InstanceRecord> = planned.iter().map(|p| &p.record).collect();
    write_jsonl(&instances_path, &records)?;
    Ok(SampleSummary {
        images: jobs.len(),
        instances: planned.len(),
        categories: config.categories,
        corrupt,
        manifest: manifest_path,
        instances_file: instances_path,
    })
}

/// Layout of a contact sheet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SheetLayout {
    /// How many categories (the first ones) to show.
    pub categories: usize,
    /// Width and height of one image on the sheet.
    pub cell: u32,
}

impl Default for SheetLayout {
    fn default() -> Self {
        SheetLayout {
            categories: 6,
            cell: 96,
        }
    }
}

const CELL_GAP: u32 = 2;
const BLOCK_GAP: u32 = 14;
const SHEET_BACKGROUND: Rgb<u8> = Rgb([250, 250, 248]);

/// One image of the first categories of `config`: a block per category, three blocks a row;
/// in a block, one row per instance (the base first) and one column per view.
pub fn contact_sheet(config: &SynthConfig, layout: SheetLayout) -> Result<RgbImage, SynthError> {
    if layout.cell < SynthConfig::MIN_SIZE || layout.cell > SynthConfig::MAX_SIZE {
        return Err(SynthError::Config(format!(
            "contact sheet cells must be {} to {} pixels",
            SynthConfig::MIN_SIZE,
            SynthConfig::MAX_SIZE
        )));
    }
    let categories = layout.categories.clamp(1, config.categories);
    let shown = SynthConfig {
        categories,
        ..config.clone()
    };
    let planned = plan(&shown)?;
    let cell = layout.cell;
    let block_w = config.views as u32 * (cell + CELL_GAP) - CELL_GAP;
    let block_h = config.instances as u32 * (cell + CELL_GAP) - CELL_GAP;
    let across = categories.min(3) as u32;
    let down = categories.div_ceil(3) as u32;
    let mut sheet = RgbImage::from_pixel(
        across * (block_w + BLOCK_GAP) + BLOCK_GAP,
        down * (block_h + BLOCK_GAP) + BLOCK_GAP,
        SHEET_BACKGROUND,
    );
    let jobs: Vec<(usize, usize)> = (0..planned.len())
        .flat_map(|i| (0..config.views).map(move |v| (i, v)))
        .collect();
    let images = parallel_map(&jobs, |&(i, v)| {
        render(&planned[i].design, &planned[i].views[v], cell)
    });
    for (&(i, v), image) in jobs.iter().zip(images) {
        let (c, row) = (i / config.instances, i % config.instances);
        let x0 = BLOCK_GAP + (c as u32 % 3) * (block_w + BLOCK_GAP) + v as u32 * (cell + CELL_GAP);
        let y0 =
            BLOCK_GAP + (c as u32 / 3) * (block_h + BLOCK_GAP) + row as u32 * (cell + CELL_GAP);
        image::imageops::replace(&mut sheet, &image, i64::from(x0), i64::from(y0));
    }
    Ok(sheet)
}

/// Writes [`contact_sheet`] as a maximally compressed PNG.
pub fn write_contact_sheet(
    config: &SynthConfig,
    layout: SheetLayout,
    path: &Path,
) -> Result<(), SynthError> {
    let sheet = contact_sheet(config, layout)?;
    write_file(path, &encode_png(&sheet, CompressionType::Best))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_fixed_functions_of_seed_and_names() {
        // A change here changes every generated image: bump it only on purpose.
        let mut s = Stream::derive(42, &["mug", "base"]);
        let first = s.next_u64();
        assert_eq!(Stream::derive(42, &["mug", "base"]).next_u64(), first);
        assert_ne!(Stream::derive(43, &["mug", "base"]).next_u64(), first);
        assert_ne!(Stream::derive(42, &["mu", "gbase"]).next_u64(), first);
        let u = Stream::derive(1, &[]).unit();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn every_style_and_marking_of_every_kind_draws() {
        let mut rng = Stream::derive(7, &["test"]);
        for kind in KINDS {
            let base = Design::sample(kind, &mut rng);
            for (i, param) in kind.params().iter().enumerate() {
                let values: Vec<Value> = match *param {
                    Param::Style { options, .. } => (0..options.len()).map(Value::Style).collect(),
                    Param::Mark {
                        kind: mark_kind, ..
                    } => (0..mark_kind.styles().len())
                        .map(|variant| {
                            Value::Mark(Some(Mark {
                                at: 0.5,
                                colour: [1.0, 0.0, 0.0],
                                variant,
                            }))
                        })
                        .chain([Value::Mark(None)])
                        .collect(),
                    _ => vec![base.values[i]],
                };
                for value in values {
                    let mut d = base.clone();
                    d.values[i] = value;
                    let parts = d.parts();
                    assert!(parts.len() > 2, "{kind:?} draws parts");
                    let b = parts.iter().fold(Bounds::EMPTY, |b, p| b.union(p.bounds));
                    assert!(
                        b.min.x > -1.05 && b.max.x < 1.05 && b.min.y > -1.05 && b.max.y < 1.05,
                        "{kind:?} {} fits its frame: {b:?}",
                        param.key()
                    );
                }
            }
        }
    }

    #[test]
    fn a_variation_changes_exactly_one_param_and_says_which() {
        let mut rng = Stream::derive(3, &["vary"]);
        for kind in KINDS {
            let base = Design::sample(kind, &mut rng);
            for i in 0..kind.params().len() {
                let (varied, difference) = base.vary(i, &mut rng);
                let changed: Vec<usize> = (0..base.values.len())
                    .filter(|&j| base.values[j] != varied.values[j])
                    .collect();
                assert_eq!(changed, vec![i], "{kind:?} {}", kind.params()[i].key());
                assert_eq!(difference.property, kind.params()[i].key());
                assert_ne!(difference.from, difference.to);
            }
        }
    }

    #[test]
    fn shapes_contain_what_they_should() {
        let ring = ring(v2(0.0, 0.0), v2(0.5, 0.5), 0.1, Keep::Right);
        assert!(ring.contains(v2(0.5, 0.0)));
        assert!(!ring.contains(v2(-0.5, 0.0)), "the left half is cut away");
        assert!(!ring.contains(v2(0.0, 0.0)));
        let rect = Shape::rounded(v2(0.0, 0.0), v2(1.0, 0.5), 0.2);
        assert!(rect.contains(v2(0.95, 0.0)));
        assert!(!rect.contains(v2(0.99, 0.49)), "corners are rounded");
        let tri = Shape::Polygon(vec![v2(0.0, 0.0), v2(1.0, 0.0), v2(0.0, 1.0)]);
        assert!(tri.contains(v2(0.2, 0.2)) && !tri.contains(v2(0.8, 0.8)));
        let (h, s, v) = to_hsv(hex(0x1f4e8c));
        let back = from_hsv(h, s, v);
        assert!(distance(back, hex(0x1f4e8c)) < 1e-4);
    }
}
