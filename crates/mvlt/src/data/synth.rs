//! The built-in synthetic fashion catalogue: product "photos" and Fashion-Gen-style captions, so
//! every command runs on a fresh machine with no download.
//!
//! Each product has a category, a sub-category with its own silhouette, a colour, a pattern, an
//! optional secondary colour and visible details; it is drawn (anti-aliased, by tiny-skia) in 2-3
//! views with pose, size and position jitter on a noisy off-white background, sometimes with a
//! shadow. Some products are near-duplicates of the previous one differing in exactly one visible
//! attribute (hard negatives). Captions mention the visible attributes among distractors that are
//! not visible (materials, closures, care). Everything is a pure function of (seed, product, view).

use super::dataset::Record;
use anyhow::{bail, Context, Result};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::path::Path;
use tiny_skia::{
    Color, FillRule, GradientStop, LinearGradient, Mask, Paint, Path as SkPath, PathBuilder, Pixmap, Point, Shader,
    SpreadMode, Stroke, Transform,
};

/// (main category, sub-category, silhouette). Coordinates are in a 100x100 box, y down.
pub struct Garment {
    pub category: &'static str,
    pub subcategory: &'static str,
    pub noun: &'static [&'static str],
    shape: Shape,
    details: &'static [Detail],
}

enum Shape {
    Poly(&'static [(f32, f32)]),
    /// Bag with handles: body polygon + handle arc between two x positions at height y.
    Bag(&'static [(f32, f32)], f32, f32, f32),
    /// Hats: dome ellipse (cx, cy, rx, ry) + brim polygon.
    Hat((f32, f32, f32, f32), &'static [(f32, f32)]),
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Detail {
    Buttons,
    Pockets,
    Logo,
}

use Detail::*;

pub const GARMENTS: &[Garment] = &[
    Garment {
        category: "TOPS",
        subcategory: "T-SHIRTS",
        noun: &["t-shirt", "tee"],
        details: &[Logo, Pockets],
        shape: Shape::Poly(&[
            (30., 10.),
            (42., 8.),
            (50., 14.),
            (58., 8.),
            (70., 10.),
            (90., 25.),
            (82., 36.),
            (72., 30.),
            (72., 90.),
            (28., 90.),
            (28., 30.),
            (18., 36.),
            (10., 25.),
        ]),
    },
    Garment {
        category: "TOPS",
        subcategory: "SHIRTS",
        noun: &["shirt", "button-down shirt"],
        details: &[Buttons, Pockets],
        shape: Shape::Poly(&[
            (32., 10.),
            (44., 6.),
            (50., 16.),
            (56., 6.),
            (68., 10.),
            (86., 30.),
            (92., 78.),
            (82., 80.),
            (74., 40.),
            (74., 92.),
            (26., 92.),
            (26., 40.),
            (18., 80.),
            (8., 78.),
            (14., 30.),
        ]),
    },
    Garment {
        category: "TOPS",
        subcategory: "SWEATERS",
        noun: &["sweater", "pullover", "jumper"],
        details: &[Logo],
        shape: Shape::Poly(&[
            (30., 12.),
            (42., 9.),
            (50., 13.),
            (58., 9.),
            (70., 12.),
            (88., 28.),
            (94., 80.),
            (84., 84.),
            (76., 44.),
            (76., 86.),
            (78., 92.),
            (22., 92.),
            (24., 86.),
            (24., 44.),
            (16., 84.),
            (6., 80.),
            (12., 28.),
        ]),
    },
    Garment {
        category: "TOPS",
        subcategory: "HOODIES",
        noun: &["hoodie", "hooded sweatshirt"],
        details: &[Pockets, Logo],
        shape: Shape::Poly(&[
            (34., 16.),
            (36., 5.),
            (44., 1.),
            (56., 1.),
            (64., 5.),
            (66., 16.),
            (86., 30.),
            (92., 80.),
            (82., 82.),
            (74., 44.),
            (74., 92.),
            (26., 92.),
            (26., 44.),
            (18., 82.),
            (8., 80.),
            (14., 30.),
        ]),
    },
    Garment {
        category: "TOPS",
        subcategory: "TANK TOPS",
        noun: &["tank top", "camisole"],
        details: &[Logo],
        shape: Shape::Poly(&[
            (35., 6.),
            (40., 6.),
            (44., 18.),
            (56., 18.),
            (60., 6.),
            (65., 6.),
            (68., 28.),
            (70., 92.),
            (30., 92.),
            (32., 28.),
        ]),
    },
    Garment {
        category: "PANTS",
        subcategory: "JEANS",
        noun: &["jeans", "denim"],
        details: &[Pockets, Buttons],
        shape: Shape::Poly(&[(28., 6.), (72., 6.), (76., 94.), (58., 94.), (50., 30.), (42., 94.), (24., 94.)]),
    },
    Garment {
        category: "PANTS",
        subcategory: "TROUSERS",
        noun: &["trousers", "pants"],
        details: &[Pockets],
        shape: Shape::Poly(&[(30., 6.), (70., 6.), (82., 94.), (57., 94.), (50., 34.), (43., 94.), (18., 94.)]),
    },
    Garment {
        category: "PANTS",
        subcategory: "SHORTS",
        noun: &["shorts"],
        details: &[Pockets],
        shape: Shape::Poly(&[(24., 22.), (76., 22.), (82., 70.), (56., 72.), (50., 44.), (44., 72.), (18., 70.)]),
    },
    Garment {
        category: "SKIRTS",
        subcategory: "MINI SKIRTS",
        noun: &["miniskirt", "mini skirt"],
        details: &[Buttons],
        shape: Shape::Poly(&[(34., 25.), (66., 25.), (82., 66.), (18., 66.)]),
    },
    Garment {
        category: "SKIRTS",
        subcategory: "MIDI SKIRTS",
        noun: &["midi skirt", "skirt"],
        details: &[Pockets],
        shape: Shape::Poly(&[(38., 10.), (62., 10.), (76., 50.), (86., 92.), (14., 92.), (24., 50.)]),
    },
    Garment {
        category: "DRESSES",
        subcategory: "MINI DRESSES",
        noun: &["minidress", "short dress"],
        details: &[Buttons, Logo],
        shape: Shape::Poly(&[
            (36., 6.),
            (42., 6.),
            (46., 14.),
            (54., 14.),
            (58., 6.),
            (64., 6.),
            (64., 30.),
            (80., 72.),
            (20., 72.),
            (36., 30.),
        ]),
    },
    Garment {
        category: "DRESSES",
        subcategory: "MAXI DRESSES",
        noun: &["maxi dress", "gown"],
        details: &[Buttons],
        shape: Shape::Poly(&[
            (40., 2.),
            (45., 2.),
            (47., 10.),
            (53., 10.),
            (55., 2.),
            (60., 2.),
            (61., 26.),
            (84., 97.),
            (16., 97.),
            (39., 26.),
        ]),
    },
    Garment {
        category: "DRESSES",
        subcategory: "SHIFT DRESSES",
        noun: &["shift dress", "dress"],
        details: &[Pockets, Buttons],
        shape: Shape::Poly(&[
            (30., 8.),
            (42., 6.),
            (50., 12.),
            (58., 6.),
            (70., 8.),
            (80., 20.),
            (72., 28.),
            (72., 90.),
            (28., 90.),
            (28., 28.),
            (20., 20.),
        ]),
    },
    Garment {
        category: "JACKETS & COATS",
        subcategory: "BLAZERS",
        noun: &["blazer", "tailored jacket"],
        details: &[Buttons, Pockets],
        shape: Shape::Poly(&[
            (32., 8.),
            (44., 6.),
            (50., 32.),
            (56., 6.),
            (68., 8.),
            (86., 26.),
            (92., 80.),
            (82., 82.),
            (74., 42.),
            (74., 84.),
            (26., 84.),
            (26., 42.),
            (18., 82.),
            (8., 80.),
            (14., 26.),
        ]),
    },
    Garment {
        category: "JACKETS & COATS",
        subcategory: "COATS",
        noun: &["coat", "overcoat"],
        details: &[Buttons, Pockets],
        shape: Shape::Poly(&[
            (34., 4.),
            (44., 2.),
            (50., 24.),
            (56., 2.),
            (66., 4.),
            (84., 20.),
            (90., 76.),
            (81., 78.),
            (75., 36.),
            (80., 98.),
            (20., 98.),
            (25., 36.),
            (19., 78.),
            (10., 76.),
            (16., 20.),
        ]),
    },
    Garment {
        category: "JACKETS & COATS",
        subcategory: "BOMBER JACKETS",
        noun: &["bomber jacket", "bomber"],
        details: &[Pockets, Logo],
        shape: Shape::Poly(&[
            (30., 16.),
            (70., 16.),
            (88., 30.),
            (93., 72.),
            (83., 75.),
            (77., 44.),
            (79., 78.),
            (74., 84.),
            (26., 84.),
            (21., 78.),
            (23., 44.),
            (17., 75.),
            (7., 72.),
            (12., 30.),
        ]),
    },
    Garment {
        category: "SHOES",
        subcategory: "SNEAKERS",
        noun: &["sneakers", "trainers"],
        details: &[Logo],
        shape: Shape::Poly(&[
            (8., 62.),
            (28., 56.),
            (42., 40.),
            (60., 42.),
            (78., 54.),
            (92., 60.),
            (93., 76.),
            (8., 76.),
        ]),
    },
    Garment {
        category: "SHOES",
        subcategory: "BOOTS",
        noun: &["boots", "ankle boots"],
        details: &[Buttons],
        shape: Shape::Poly(&[(30., 10.), (56., 10.), (57., 58.), (84., 64.), (90., 80.), (30., 80.)]),
    },
    Garment {
        category: "SHOES",
        subcategory: "HEELS",
        noun: &["heels", "pumps"],
        details: &[],
        shape: Shape::Poly(&[
            (12., 56.),
            (40., 50.),
            (68., 38.),
            (86., 42.),
            (89., 52.),
            (80., 56.),
            (79., 80.),
            (74., 80.),
            (72., 58.),
            (42., 63.),
            (18., 72.),
            (12., 66.),
        ]),
    },
    Garment {
        category: "BAGS",
        subcategory: "TOTE BAGS",
        noun: &["tote", "tote bag"],
        details: &[Logo, Pockets],
        shape: Shape::Bag(&[(18., 40.), (82., 40.), (88., 92.), (12., 92.)], 30., 70., 14.),
    },
    Garment {
        category: "BAGS",
        subcategory: "BACKPACKS",
        noun: &["backpack"],
        details: &[Pockets, Logo],
        shape: Shape::Bag(&[(26., 22.), (40., 14.), (60., 14.), (74., 22.), (78., 90.), (22., 90.)], 42., 58., 6.),
    },
    Garment {
        category: "BAGS",
        subcategory: "CLUTCHES",
        noun: &["clutch", "pouch"],
        details: &[Buttons],
        shape: Shape::Poly(&[(10., 40.), (90., 40.), (90., 72.), (10., 72.)]),
    },
    Garment {
        category: "HATS",
        subcategory: "CAPS",
        noun: &["cap", "baseball cap"],
        details: &[Logo],
        shape: Shape::Hat((46., 56., 30., 24.), &[(40., 56.), (94., 58.), (90., 66.), (40., 64.)]),
    },
    Garment {
        category: "HATS",
        subcategory: "BEANIES",
        noun: &["beanie", "knit hat"],
        details: &[Logo],
        shape: Shape::Hat((50., 54., 30., 34.), &[(18., 56.), (82., 56.), (82., 74.), (18., 74.)]),
    },
    Garment {
        category: "HATS",
        subcategory: "FEDORAS",
        noun: &["fedora", "felt hat"],
        details: &[],
        shape: Shape::Hat((50., 48., 22., 20.), &[(8., 58.), (92., 58.), (84., 68.), (16., 68.)]),
    },
    Garment {
        category: "SCARVES",
        subcategory: "SCARVES",
        noun: &["scarf", "muffler"],
        details: &[],
        shape: Shape::Poly(&[(40., 4.), (60., 4.), (63., 94.), (37., 94.)]),
    },
];

pub const COLOURS: &[(&str, [u8; 3])] = &[
    ("black", [25, 25, 28]),
    ("white", [246, 246, 240]),
    ("navy", [28, 38, 84]),
    ("red", [196, 30, 40]),
    ("burgundy", [110, 20, 40]),
    ("green", [40, 130, 60]),
    ("olive", [110, 110, 50]),
    ("beige", [214, 196, 160]),
    ("brown", [110, 70, 40]),
    ("grey", [128, 128, 132]),
    ("pink", [236, 150, 180]),
    ("yellow", [240, 200, 40]),
    ("blue", [50, 110, 200]),
    ("orange", [236, 120, 30]),
    ("purple", [110, 60, 150]),
];

pub const PATTERNS: &[&str] = &["solid", "striped", "polka-dot", "check", "gradient", "floral print"];
const MATERIALS: &[&str] =
    &["cotton", "wool", "silk", "linen", "leather", "denim", "nylon", "cashmere", "jersey", "twill", "satin", "canvas"];
const CLOSURES: &[&str] = &[
    "Zip closure at back.",
    "Concealed zip closure at side.",
    "Hook-and-eye closure.",
    "Snap-button closure.",
    "Drawstring at waistband.",
    "Lace-up closure.",
    "Magnetic press-stud fastening.",
    "Slip-on styling.",
];
const EXTRAS: &[&str] = &[
    "Tonal stitching.",
    "Fully lined.",
    "Unlined.",
    "Regular fit.",
    "Relaxed fit.",
    "Slim fit.",
    "Dry clean only.",
    "Machine wash cold.",
    "Raw edge at hem.",
    "Rib knit trim.",
    "Made in Italy.",
    "Made in Portugal.",
];
const OPENERS: &[&str] = &["", "Long ", "Oversized ", "Cropped ", "Classic ", "Relaxed ", "Structured "];

/// A product's visible and invisible attributes.
#[derive(Clone, Debug, PartialEq)]
pub struct Product {
    pub id: String,
    pub garment: usize,
    pub colour: usize,
    pub pattern: usize,
    pub secondary: usize,
    pub details: Vec<Detail>,
    pub material: usize,
    pub closure: usize,
    pub extras: [usize; 2],
    pub opener: usize,
    pub views: usize,
}

impl Product {
    fn random(id: String, rng: &mut ChaCha8Rng) -> Product {
        let garment = rng.random_range(0..GARMENTS.len());
        let colour = rng.random_range(0..COLOURS.len());
        let mut secondary = rng.random_range(0..COLOURS.len());
        if secondary == colour {
            secondary = (secondary + 1 + rng.random_range(0..COLOURS.len() - 1)) % COLOURS.len();
        }
        let details = GARMENTS[garment].details.iter().copied().filter(|_| rng.random_bool(0.5)).collect();
        Product {
            id,
            garment,
            colour,
            pattern: if rng.random_bool(0.4) { 0 } else { rng.random_range(1..PATTERNS.len()) },
            secondary,
            details,
            material: rng.random_range(0..MATERIALS.len()),
            closure: rng.random_range(0..CLOSURES.len()),
            extras: [rng.random_range(0..EXTRAS.len()), rng.random_range(0..EXTRAS.len())],
            opener: rng.random_range(0..OPENERS.len()),
            views: rng.random_range(2..=3),
        }
    }

    /// The same product but for exactly one visible attribute.
    fn near_duplicate(&self, id: String, rng: &mut ChaCha8Rng) -> Product {
        let mut p = self.clone();
        p.id = id;
        match rng.random_range(0..3) {
            0 => p.colour = (p.colour + rng.random_range(1..COLOURS.len())) % COLOURS.len(),
            1 => p.pattern = (p.pattern + rng.random_range(1..PATTERNS.len())) % PATTERNS.len(),
            _ => {
                let all = GARMENTS[p.garment].details;
                if all.is_empty() {
                    p.colour = (p.colour + 1) % COLOURS.len();
                } else {
                    let d = all[rng.random_range(0..all.len())];
                    if let Some(i) = p.details.iter().position(|&x| x == d) {
                        p.details.remove(i);
                    } else {
                        p.details.push(d);
                    }
                }
            }
        }
        if p.secondary == p.colour {
            p.secondary = (p.secondary + 1) % COLOURS.len();
        }
        p
    }

    pub fn caption(&self, rng: &mut ChaCha8Rng) -> String {
        let g = &GARMENTS[self.garment];
        let noun = g.noun.choose(rng).unwrap();
        let colour = COLOURS[self.colour].0;
        let second = COLOURS[self.secondary].0;
        let material = MATERIALS[self.material];
        let mut s = vec![];
        let head = match rng.random_range(0..3) {
            0 => format!("{}{material} {noun} in {colour}.", OPENERS[self.opener]),
            1 => format!("{}{colour} {material} {noun}.", OPENERS[self.opener]),
            _ => format!("{}{noun} in {colour} {material}.", OPENERS[self.opener]),
        };
        s.push(capitalise(&head));
        match PATTERNS[self.pattern] {
            "solid" => {}
            "striped" => s.push(format!("{} stripes throughout.", capitalise(second))),
            "polka-dot" => s.push(format!("{} polka dots throughout.", capitalise(second))),
            "check" => s.push(format!("Check pattern in {colour} and {second}.")),
            "gradient" => s.push(format!("Gradient fading to {second}.")),
            _ => s.push(format!("Floral print in {second}.")),
        }
        for d in &self.details {
            s.push(match d {
                Buttons => ["Button closure at front.", "Tonal buttons at front.", "Buttoned placket."]
                    .choose(rng)
                    .unwrap()
                    .to_string(),
                Pockets => {
                    ["Patch pockets.", "Two-pocket styling.", "Flap pockets at front."].choose(rng).unwrap().to_string()
                }
                Logo => format!("Logo patch in {second}."),
            });
        }
        s.push(CLOSURES[self.closure].to_string());
        s.push(EXTRAS[self.extras[0]].to_string());
        if self.extras[1] != self.extras[0] {
            s.push(EXTRAS[self.extras[1]].to_string());
        }
        s.join(" ")
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
}

fn rgb(c: [u8; 3], shade: f32) -> Color {
    let f = |v: u8| ((v as f32 * shade).clamp(0.0, 255.0)) as u8;
    Color::from_rgba8(f(c[0]), f(c[1]), f(c[2]), 255)
}

fn poly(points: &[(f32, f32)]) -> Option<SkPath> {
    let mut pb = PathBuilder::new();
    pb.move_to(points[0].0, points[0].1);
    for p in &points[1..] {
        pb.line_to(p.0, p.1);
    }
    pb.close();
    pb.finish()
}

fn silhouette(shape: &Shape) -> Option<SkPath> {
    match shape {
        Shape::Poly(p) | Shape::Bag(p, ..) => poly(p),
        Shape::Hat((cx, cy, rx, ry), brim) => {
            let mut pb = PathBuilder::new();
            // Upper half ellipse as the dome, then the brim.
            if let Some(r) = tiny_skia::Rect::from_xywh(cx - rx, cy - ry, 2.0 * rx, 2.0 * ry) {
                pb.push_oval(r);
            }
            let mut b = PathBuilder::new();
            b.move_to(brim[0].0, brim[0].1);
            for p in &brim[1..] {
                b.line_to(p.0, p.1);
            }
            b.close();
            let dome = pb.finish()?;
            let mut all = PathBuilder::new();
            all.push_path(&dome);
            all.push_path(&b.finish()?);
            all.finish()
        }
    }
}

fn solid(c: Color) -> Paint<'static> {
    let mut p = Paint::default();
    p.set_color(c);
    p.anti_alias = true;
    p
}

/// Draw one view of a product as `size x size` RGB.
pub fn render(p: &Product, view: usize, size: u32, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut pm = Pixmap::new(size, size).expect("size > 0");
    fill_background(&mut pm, size, rng);
    let s = size as f32 / 100.0;
    let t = pose(view, s, rng);
    let g = &GARMENTS[p.garment];
    let Some(path) = silhouette(&g.shape) else { return pm_to_rgb(&pm) };

    if rng.random_bool(0.35) {
        let st = t.post_translate(2.5 * s, 3.0 * s);
        pm.fill_path(&path, &solid(Color::from_rgba8(60, 55, 50, 60)), FillRule::Winding, st, None);
    }
    let mut mask = Mask::new(size, size).expect("size > 0");
    mask.fill_path(&path, FillRule::Winding, true, t);

    let main = COLOURS[p.colour].1;
    let light = rng.random_range(0.92..1.06f32);
    let full = tiny_skia::Rect::from_xywh(0.0, 0.0, size as f32, size as f32).unwrap();
    pm.fill_rect(full, &solid(rgb(main, light)), Transform::identity(), Some(&mask));
    fill_pattern(&mut pm, p, light, t, &mask);
    draw_edges(&mut pm, &path, &g.shape, main, light, t);
    draw_details(&mut pm, p, t, &mask);
    let mut out = pm_to_rgb(&pm);
    // Sensor noise.
    for v in out.iter_mut() {
        let n = rng.random_range(-3i16..=3);
        *v = (*v as i16 + n).clamp(0, 255) as u8;
    }
    out
}

/// Off-white studio background with a faint vertical gradient.
fn fill_background(pm: &mut Pixmap, size: u32, rng: &mut ChaCha8Rng) {
    let bg = [rng.random_range(232..250u8), rng.random_range(232..248u8), rng.random_range(228..246u8)];
    let top = rgb(bg, 1.02);
    let bottom = rgb(bg, 0.97);
    let paint = Paint {
        shader: LinearGradient::new(
            Point::from_xy(0.0, 0.0),
            Point::from_xy(0.0, size as f32),
            vec![GradientStop::new(0.0, top), GradientStop::new(1.0, bottom)],
            SpreadMode::Pad,
            Transform::identity(),
        )
        .unwrap_or(Shader::SolidColor(top)),
        ..Paint::default()
    };
    pm.fill_rect(
        tiny_skia::Rect::from_xywh(0.0, 0.0, size as f32, size as f32).unwrap(),
        &paint,
        Transform::identity(),
        None,
    );
}

/// Pose: each view rotates, scales and shifts the product differently. `s`: pixels per unit of
/// the garments' 100 x 100 drawing space.
fn pose(view: usize, s: f32, rng: &mut ChaCha8Rng) -> Transform {
    let scale = rng.random_range(0.72..0.92f32) * s;
    let angle = rng.random_range(-9.0..9.0f32)
        + if view == 1 {
            4.0
        } else if view == 2 {
            -4.0
        } else {
            0.0
        };
    let (dx, dy) = (rng.random_range(-6.0..6.0f32) * s, rng.random_range(-5.0..5.0f32) * s);
    let mirror = view == 1 && rng.random_bool(0.5);
    let c = 50.0 * s;
    Transform::from_translate(c + dx, c + dy)
        .pre_rotate(angle)
        .pre_scale(if mirror { -scale } else { scale }, scale)
        .pre_translate(-50.0, -50.0)
}

/// The product's pattern in its secondary colour, inside the garment's `mask`.
fn fill_pattern(pm: &mut Pixmap, p: &Product, light: f32, t: Transform, mask: &Mask) {
    let size = pm.width() as f32;
    let (main, second) = (COLOURS[p.colour].1, COLOURS[p.secondary].1);
    let full = tiny_skia::Rect::from_xywh(0.0, 0.0, size, size).unwrap();
    let mask = Some(mask);
    let sec = solid(rgb(second, light));
    let step = 10.0f32;
    match PATTERNS[p.pattern] {
        "striped" => {
            for i in (-2..14).step_by(2) {
                if let Some(r) = tiny_skia::Rect::from_xywh(-10.0, i as f32 * step * 0.5 + 3.0, 120.0, step * 0.3) {
                    pm.fill_rect(r, &sec, t, mask);
                }
            }
        }
        "polka-dot" => {
            let mut pb = PathBuilder::new();
            for y in 0..12 {
                for x in 0..12 {
                    pb.push_circle(x as f32 * 9.0 + if y % 2 == 0 { 0.0 } else { 4.5 }, y as f32 * 9.0, 2.2);
                }
            }
            if let Some(dots) = pb.finish() {
                pm.fill_path(&dots, &sec, FillRule::Winding, t, mask);
            }
        }
        "check" => {
            let mut c2 = solid(rgb(second, light));
            c2.shader = Shader::SolidColor({
                let mut col = rgb(second, light);
                col.set_alpha(0.55);
                col
            });
            for i in 0..12 {
                let f = i as f32 * 9.0;
                if let Some(r) = tiny_skia::Rect::from_xywh(f, -5.0, 3.5, 110.0) {
                    pm.fill_rect(r, &c2, t, mask);
                }
                if let Some(r) = tiny_skia::Rect::from_xywh(-5.0, f, 110.0, 3.5) {
                    pm.fill_rect(r, &c2, t, mask);
                }
            }
        }
        "gradient" => {
            let gp = Paint {
                shader: LinearGradient::new(
                    Point::from_xy(0.0, 5.0),
                    Point::from_xy(0.0, 95.0),
                    vec![GradientStop::new(0.0, rgb(main, light)), GradientStop::new(1.0, rgb(second, light))],
                    SpreadMode::Pad,
                    t,
                )
                .unwrap_or(Shader::SolidColor(rgb(main, light))),
                ..Paint::default()
            };
            pm.fill_rect(full, &gp, Transform::identity(), mask);
        }
        "floral print" => {
            let mut pb = PathBuilder::new();
            let mut prng = ChaCha8Rng::seed_from_u64(p.id.len() as u64 * 7919 + p.colour as u64);
            for _ in 0..40 {
                let (x, y) = (prng.random_range(0.0..100.0f32), prng.random_range(0.0..100.0f32));
                for k in 0..5 {
                    let a = k as f32 * 1.2566;
                    pb.push_circle(x + 2.2 * a.cos(), y + 2.2 * a.sin(), 1.6);
                }
            }
            if let Some(fl) = pb.finish() {
                pm.fill_path(&fl, &sec, FillRule::Winding, t, mask);
            }
        }
        _ => {}
    }
}

/// A darker edge like a product photo's, and a bag's handle.
fn draw_edges(pm: &mut Pixmap, path: &tiny_skia::Path, shape: &Shape, main: [u8; 3], light: f32, t: Transform) {
    pm.stroke_path(path, &solid(rgb(main, 0.6 * light)), &Stroke { width: 1.2, ..Default::default() }, t, None);
    if let Shape::Bag(pts, x0, x1, depth) = shape {
        let (x0, x1, depth) = (*x0, *x1, *depth);
        let top = pts.iter().map(|p| p.1).fold(f32::MAX, f32::min);
        let mut pb = PathBuilder::new();
        pb.move_to(x0, top);
        pb.cubic_to(x0, top - depth * 1.3, x1, top - depth * 1.3, x1, top);
        if let Some(h) = pb.finish() {
            pm.stroke_path(&h, &solid(rgb(main, 0.55)), &Stroke { width: 3.0, ..Default::default() }, t, None);
        }
    }
}

/// Buttons, pockets and logos.
fn draw_details(pm: &mut Pixmap, p: &Product, t: Transform, mask: &Mask) {
    let (main, second) = (COLOURS[p.colour].1, COLOURS[p.secondary].1);
    let mask = Some(mask);
    for d in &p.details {
        match d {
            Buttons => {
                let mut pb = PathBuilder::new();
                for k in 0..4 {
                    pb.push_circle(50.0, 36.0 + k as f32 * 11.0, 1.8);
                }
                if let Some(b) = pb.finish() {
                    pm.fill_path(&b, &solid(rgb(second, 0.8)), FillRule::Winding, t, mask);
                }
            }
            Pockets => {
                for x in [34.0, 56.0] {
                    if let Some(r) = tiny_skia::Rect::from_xywh(x, 58.0, 10.0, 10.0) {
                        let pb = PathBuilder::from_rect(r);
                        pm.stroke_path(
                            &pb,
                            &solid(rgb(main, 0.5)),
                            &Stroke { width: 1.3, ..Default::default() },
                            t,
                            mask,
                        );
                    }
                }
            }
            Logo => {
                if let Some(r) = tiny_skia::Rect::from_xywh(55.0, 42.0, 10.0, 6.0) {
                    pm.fill_rect(r, &solid(rgb(second, 1.0)), t, mask);
                }
            }
        }
    }
}

fn pm_to_rgb(pm: &Pixmap) -> Vec<u8> {
    // The background is opaque, so premultiplied RGBA is plain RGBA.
    pm.data().chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect()
}

/// All products of a catalogue, deterministic in `seed`.
pub fn products(n_products: usize, seed: u64) -> Vec<Product> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out: Vec<Product> = Vec::with_capacity(n_products);
    for i in 0..n_products {
        let id = format!("{:06}", 100000 + i);
        // One product in six is a near-duplicate of the one before (a hard negative for retrieval).
        let p = match out.last() {
            Some(prev) if rng.random_bool(1.0 / 6.0) => prev.near_duplicate(id, &mut rng),
            _ => Product::random(id, &mut rng),
        };
        out.push(p);
    }
    out
}

fn view_rng(seed: u64, product: usize, view: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (product as u64).wrapping_mul(0x9E3779B97F4A7C15) ^ ((view as u64 + 1) << 56))
}

/// The words of a caption that only the image can tell: colours, patterns and garment names
/// (materials, closures and care notes are not drawn). MLM's focus list in the demo's recipe.
pub fn attribute_words() -> Vec<String> {
    let mut words = BTreeSet::new();
    let text = COLOURS
        .iter()
        .map(|c| c.0)
        .chain(PATTERNS.iter().copied())
        .chain(GARMENTS.iter().flat_map(|g| g.noun.iter().copied()));
    for phrase in text.chain(["stripes", "dots", "check", "floral", "buttons", "pockets", "logo", "placket"]) {
        for w in phrase.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
            words.insert(w.to_lowercase());
        }
    }
    words.into_iter().collect()
}

/// Every word the generator can write, for the small built-in vocabulary.
pub fn caption_words() -> BTreeSet<String> {
    let mut text = String::new();
    for g in GARMENTS {
        text += &format!(" {} {} ", g.noun.join(" "), g.subcategory);
    }
    for (c, _) in COLOURS {
        text += &format!(" {c} ");
    }
    for t in MATERIALS.iter().chain(CLOSURES).chain(EXTRAS).chain(OPENERS).chain(PATTERNS) {
        text += &format!(" {t} ");
    }
    text += " stripes throughout polka dots check pattern in and gradient fading to floral print button closure at front tonal buttons buttoned placket patch pockets two-pocket styling flap pockets logo ";
    let mut words = BTreeSet::new();
    let mut cur = String::new();
    for ch in text.to_lowercase().chars() {
        if ch.is_alphanumeric() {
            cur.push(ch);
        } else {
            if !cur.is_empty() {
                words.insert(std::mem::take(&mut cur));
            }
            if !ch.is_whitespace() {
                words.insert(ch.to_string());
            }
        }
    }
    words
}

/// A BERT-compatible WordPiece vocabulary: [PAD] at 0, [unused] fillers, [UNK] 100, [CLS] 101,
/// [SEP] 102, [MASK] 103 (the ids the model and the reference expect), then single characters
/// (with and without `##`) so unseen words still tokenise, then the generator's words.
pub fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = vec!["[PAD]".into()];
    v.extend((1..100).map(|i| format!("[unused{i}]")));
    v.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
    let chars: Vec<char> = ('a'..='z').chain('0'..='9').collect();
    let mut seen: BTreeSet<String> = v.iter().cloned().collect();
    let mut push = |t: String, v: &mut Vec<String>| {
        if seen.insert(t.clone()) {
            v.push(t);
        }
    };
    for c in &chars {
        push(c.to_string(), &mut v);
    }
    for c in &chars {
        push(format!("##{c}"), &mut v);
    }
    for p in ".,;:!?%&'\"()-/#$*+".chars() {
        push(p.to_string(), &mut v);
    }
    for w in caption_words() {
        push(w, &mut v);
    }
    v
}

/// Write `n` images (products x views) with `catalog.jsonl`, `images/` and `vocab.txt` under `out`.
/// Returns the number of images written.
/// Smallest and largest side of a synthetic image: the garments need 16 pixels to be told apart,
/// and a canvas over 1024 pixels only costs memory (the reference trains at 256).
pub const MIN_SIZE: u32 = 16;
pub const MAX_SIZE: u32 = 1024;
/// Most images one synthetic catalogue holds.
pub const MAX_IMAGES: usize = 10_000_000;

pub fn write_catalog(out: &Path, n: usize, seed: u64, size: u32, progress: impl Fn(usize) + Sync) -> Result<usize> {
    if n == 0 {
        bail!("--n must be at least 1");
    }
    if n > MAX_IMAGES {
        bail!("--n must be at most {MAX_IMAGES} images, got {n}");
    }
    if !(MIN_SIZE..=MAX_SIZE).contains(&size) {
        bail!("the image size must be between {MIN_SIZE} and {MAX_SIZE} pixels (each image is drawn at that size), got {size}");
    }
    let img_dir = out.join("images");
    std::fs::create_dir_all(&img_dir).with_context(|| format!("cannot create {}", img_dir.display()))?;
    // Enough products for n images at 2-3 views each; the list is cut at exactly n images.
    let prods = products(n / 2 + 1, seed);
    let mut jobs = vec![];
    for (pi, p) in prods.iter().enumerate() {
        for v in 0..p.views {
            if jobs.len() < n {
                jobs.push((pi, v));
            }
        }
    }
    let rows: Vec<Result<String>> = jobs
        .par_iter()
        .map(|&(pi, v)| {
            let p = &prods[pi];
            let mut rng = view_rng(seed, pi, v);
            let pixels = render(p, v, size, &mut rng);
            let name = format!("{}_{}.png", p.id, v + 1);
            let path = img_dir.join(&name);
            let f = std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
            let enc = image::codecs::png::PngEncoder::new_with_quality(std::io::BufWriter::new(f), image::codecs::png::CompressionType::Fast, image::codecs::png::FilterType::Sub);
            image::ImageEncoder::write_image(enc, &pixels, size, size, image::ExtendedColorType::Rgb8).with_context(|| format!("encoding {}", path.display()))?;
            // One caption per product (all views share it, as in Fashion-Gen).
            let caption = p.caption(&mut view_rng(seed, pi, 99));
            let g = &GARMENTS[p.garment];
            let rec = Record { id: format!("{}_{}", p.id, v + 1), product_id: p.id.clone(), caption, category: g.category.into(), subcategory: g.subcategory.into() };
            progress(1);
            Ok(serde_json::json!({"id": rec.id, "image": format!("images/{name}"), "caption": rec.caption, "category": rec.category, "subcategory": rec.subcategory, "product_id": rec.product_id}).to_string())
        })
        .collect();
    let mut lines = String::new();
    for r in rows {
        lines += &r?;
        lines.push('\n');
    }
    crate::files::write_atomic(&out.join("catalog.jsonl"), lines.as_bytes())?;
    crate::files::write_atomic(&out.join("vocab.txt"), (vocabulary().join("\n") + "\n").as_bytes())?;
    Ok(jobs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_has_the_promised_variety() {
        let cats: BTreeSet<_> = GARMENTS.iter().map(|g| g.category).collect();
        let subs: BTreeSet<_> = GARMENTS.iter().map(|g| g.subcategory).collect();
        assert!(cats.len() >= 8 && subs.len() >= 24, "{} categories, {} sub-categories", cats.len(), subs.len());
        assert!(COLOURS.len() >= 12 && PATTERNS.len() >= 6);
        for g in GARMENTS {
            assert!(silhouette(&g.shape).is_some(), "{}", g.subcategory);
        }
    }

    #[test]
    fn products_are_deterministic_with_near_duplicates() {
        let a = products(300, 5);
        assert_eq!(a, products(300, 5));
        assert_ne!(a, products(300, 6));
        let near = a.windows(2).filter(|w| {
            let (x, y) = (&w[0], &w[1]);
            let diffs =
                [x.colour != y.colour, x.pattern != y.pattern, x.details != y.details].iter().filter(|&&d| d).count();
            x.garment == y.garment && x.material == y.material && x.closure == y.closure && diffs == 1
        });
        assert!(near.count() >= 20);
    }

    #[test]
    fn captions_mention_visible_attributes() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for p in products(50, 2) {
            let c = p.caption(&mut rng).to_lowercase();
            assert!(c.contains(COLOURS[p.colour].0), "{c}");
            if p.pattern != 0 {
                assert!(c.contains(COLOURS[p.secondary].0), "{c}");
            }
            assert!(c.matches('.').count() >= 3, "several sentences: {c}");
        }
    }

    #[test]
    fn vocabulary_is_bert_compatible() {
        let v = vocabulary();
        assert_eq!(
            (v[0].as_str(), v[100].as_str(), v[101].as_str(), v[102].as_str(), v[103].as_str()),
            ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
        );
        let set: BTreeSet<_> = v.iter().collect();
        assert_eq!(set.len(), v.len(), "no duplicates");
        assert!(v.iter().any(|w| w == "hoodie") && v.iter().any(|w| w == "burgundy"));
    }
}
