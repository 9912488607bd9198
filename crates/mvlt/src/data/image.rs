//! Images as the reference's `rgb_loader(if_crop=True)` + `Resize((S,S))` + `ToTensor` see them:
//! decode, dither to 1 bit like PIL's `convert('1')`, crop to the box of black pixels (right/bottom
//! exclusive, as the reference), resize with PIL-style antialiased bilinear, scale to [0, 1].

use anyhow::{anyhow, bail, Context, Result};
use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::DynamicImage;
use std::path::Path;

/// Most pixels a decoded image may have (an 8000x8000 photo): larger ones are refused from their
/// header. The server sets a lower limit (`mvlt serve --max-image-pixels`).
pub const MAX_PIXELS: u64 = 64_000_000;

/// What an image may take beyond its pixels: the PNG decoder's row buffers and its ancillary
/// chunks (an ICC profile is a few KB, at most a few MB). The PNG decoder keeps this cap for the
/// whole decode, which its row buffers (width x 8 bytes) fit many times over.
pub const MAX_HEADER_BYTES: u64 = 16 << 20;

/// Decoded pixels as PIL holds them for this pipeline: 8-bit RGB, or 8-bit grey for mode-L files.
#[derive(Clone, Debug)]
pub struct Pixels {
    pub width: usize,
    pub height: usize,
    /// 1 (grey) or 3 (RGB) interleaved channels.
    pub channels: usize,
    pub data: Vec<u8>,
}

/// A PNG that claims `w`x`h` grey pixels and holds almost none (signature, IHDR, a tiny IDAT,
/// IEND): what a client sends to make a server allocate a canvas it never fills. For load tests.
pub fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        let body: Vec<u8> = kind.iter().chain(data).copied().collect();
        c.extend(&body);
        c.extend(crc32fast::hash(&body).to_be_bytes()); // PNG's CRC-32 of type and data
        c
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grey, deflate, no filter, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    // A zlib stream holding one empty stored block: far too little data, which decoders only
    // notice once they decode (they read the size, and look for this chunk, first).
    png.extend(chunk(b"IDAT", &[0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01]));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// Left, top, right, bottom; right and bottom exclusive (PIL's crop box).
pub type CropBox = [usize; 4];

/// The result of preprocessing one image.
pub struct Preprocessed {
    /// `[3, S, S]` CHW RGB u8; the model input is exactly `u8 as f32 / 255`.
    pub chw_u8: Vec<u8>,
    pub size: usize,
    /// The crop box used; `None` when the image had no black pixel after dithering (the reference
    /// crashes there) and the whole image was used.
    pub crop_box: Option<CropBox>,
}

impl Pixels {
    pub fn from_hwc_rgb(width: usize, height: usize, data: Vec<u8>) -> Self {
        Pixels { width, height, channels: 3, data }
    }

    /// Decode an image file. Grey files stay grey (PIL mode L dithers the grey values directly);
    /// everything else (RGBA, 16-bit, palette, CMYK JPEG) becomes 8-bit RGB, dropping alpha like
    /// PIL's `convert('RGB')`.
    pub fn open(path: &Path) -> Result<Pixels> {
        let bytes = crate::files::read_limited(path, "image", crate::files::MAX_IMAGE_FILE_BYTES)?;
        Self::decode(&bytes).with_context(|| format!("image {}", path.display()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Pixels> {
        Self::decode_limited(bytes, MAX_PIXELS)
    }

    /// [`Pixels::decode`] of an image of at most `max_pixels` pixels. The size is read from the
    /// header before anything is decoded, so a small file that claims a huge canvas (a 250 KB PNG
    /// of 16000x16000) is refused without allocating it; the decoder's own allocations are capped
    /// to what that many pixels need.
    pub fn decode_limited(bytes: &[u8], max_pixels: u64) -> Result<Pixels> {
        use image::ImageDecoder;
        let corrupt = |e: image::ImageError| {
            match e {
            image::ImageError::Limits(_) => anyhow!(
                "cannot decode: its header or ancillary chunks (an ICC profile, text) need more than {} MiB, or its pixels more than their size allows",
                MAX_HEADER_BYTES >> 20
            ),
            e => anyhow!("cannot decode: {e} (corrupt, truncated, or not a PNG/JPEG?)"),
        }
        };
        // One decoder: its header gives the size, then the same decoder decodes (as
        // `ImageReader::decode` does, with our limits). What the decoder takes before the
        // pixels (PNG's iCCP profile and text chunks are inflated while the header is read) is
        // capped first, so a small file cannot inflate gigabytes of "profile".
        let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| anyhow!("cannot read the image header: {e}"))?;
        let mut header_limits = image::Limits::default();
        header_limits.max_alloc = Some(MAX_HEADER_BYTES);
        reader.limits(header_limits);
        let mut decoder = reader.into_decoder().map_err(corrupt)?;
        let (w, h) = decoder.dimensions();
        if w == 0 || h == 0 {
            bail!("image has zero size ({w}x{h})");
        }
        let pixels = w as u64 * h as u64;
        if pixels > max_pixels {
            bail!("image is {w}x{h} = {pixels} pixels, over the limit of {max_pixels} pixels; scale it down first");
        }
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(w);
        limits.max_image_height = Some(h);
        // 16-bit RGBA, the widest pixel these decoders produce, plus room for their buffers.
        limits.max_alloc = Some(pixels * 8 + (16 << 20));
        limits.reserve(decoder.total_bytes()).map_err(corrupt)?;
        decoder.set_limits(limits).map_err(corrupt)?;
        let img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
        Ok(match img {
            DynamicImage::ImageLuma8(g) => {
                Pixels { width: w as usize, height: h as usize, channels: 1, data: g.into_raw() }
            }
            DynamicImage::ImageLuma16(_) => {
                Pixels { width: w as usize, height: h as usize, channels: 1, data: img.to_luma8().into_raw() }
            }
            other => Pixels { width: w as usize, height: h as usize, channels: 3, data: other.to_rgb8().into_raw() },
        })
    }

    /// The pixels as a PNG file (grey stays grey).
    pub fn to_png(&self) -> Result<Vec<u8>> {
        use image::ImageEncoder;
        let color = if self.channels == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
        let mut png = vec![];
        image::codecs::png::PngEncoder::new(&mut png).write_image(
            &self.data,
            self.width as u32,
            self.height as u32,
            color,
        )?;
        Ok(png)
    }

    /// PIL `convert('1')` (Floyd-Steinberg), as `tobilevel` in Pillow's Convert.c: integer error
    /// diffusion on the luminance `(299 R + 587 G + 114 B) / 1000` (truncating), threshold `> 128`.
    /// Written by hand because no image crate reproduces Pillow's integer arithmetic bit for bit,
    /// and the crop box depends on every bit. Calls `pixel(x, y, white)` in raster order.
    fn dither_each(&self, mut pixel: impl FnMut(usize, usize, bool)) {
        let (w, h) = (self.width, self.height);
        let mut errors = vec![0i32; w + 1];
        for y in 0..h {
            let (mut l, mut l0, mut l1) = (0i32, 0i32, 0i32);
            let row = &self.data[y * w * self.channels..(y + 1) * w * self.channels];
            for x in 0..w {
                let lum = if self.channels == 1 {
                    row[x] as i32
                } else {
                    let p = &row[x * 3..x * 3 + 3];
                    (p[0] as i32 * 299 + p[1] as i32 * 587 + p[2] as i32 * 114) / 1000
                };
                // C's `/` truncates toward zero, as Rust's does.
                l = (lum + (l + errors[x + 1]) / 16).clamp(0, 255);
                let white = l > 128;
                pixel(x, y, white);
                l -= if white { 255 } else { 0 };
                let l2 = l;
                let d2 = l + l;
                l += d2;
                errors[x] = l + l0;
                l += d2;
                l0 = l + l1;
                l1 = l2;
                l += d2;
            }
            errors[w] = l0;
        }
    }

    /// The dithered bitmap, `true` for white.
    pub fn dither(&self) -> Vec<bool> {
        let mut out = Vec::with_capacity(self.width * self.height);
        self.dither_each(|_, _, white| out.push(white));
        out
    }

    /// Bounding box of the black pixels of the dithered image, with the reference's exclusive
    /// right/bottom edges at the last black column/row (so that column/row is dropped).
    pub fn crop_box(&self) -> Option<CropBox> {
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        self.dither_each(|x, y, white| {
            if !white {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
        });
        (x0 != usize::MAX).then_some([x0, y0, x1, y1])
    }

    /// RGB copy of a region (grey replicated, as PIL's `convert('RGB')`).
    pub fn crop_rgb(&self, b: CropBox) -> Pixels {
        let [l, t, r, bt] = b;
        let (w, h) = (r - l, bt - t);
        let mut data = Vec::with_capacity(w * h * 3);
        for y in t..bt {
            let row = y * self.width;
            if self.channels == 1 {
                data.extend(self.data[row + l..row + r].iter().flat_map(|&g| [g; 3]));
            } else {
                data.extend_from_slice(&self.data[(row + l) * 3..(row + r) * 3]);
            }
        }
        Pixels { width: w, height: h, channels: 3, data }
    }
}

/// Resize RGB pixels to `size x size` with PIL's antialiased bilinear (triangle filter whose support
/// grows with the downscale factor; 8-bit fixed-point passes), via fast_image_resize.
pub fn resize_rgb(p: &Pixels, size: usize) -> Result<Vec<u8>> {
    debug_assert_eq!(p.channels, 3);
    let src = FirImage::from_vec_u8(p.width as u32, p.height as u32, p.data.clone(), PixelType::U8x3)
        .map_err(|e| anyhow!("resize source: {e}"))?;
    let mut dst = FirImage::new(size as u32, size as u32, PixelType::U8x3);
    Resizer::new()
        .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)))
        .map_err(|e| anyhow!("resize: {e}"))?;
    Ok(dst.into_vec())
}

/// `p` scaled down (never up) so that its longer side is at most `max_side`, channels kept: what
/// the server sends for a catalogue image. Takes the pixels, so a large photo is not copied.
pub fn thumbnail(p: Pixels, max_side: usize) -> Result<Pixels> {
    let longer = p.width.max(p.height);
    if longer <= max_side.max(1) {
        return Ok(p);
    }
    let scale = max_side.max(1) as f64 / longer as f64;
    let side = |n: usize| ((n as f64 * scale).round() as usize).max(1);
    let (w, h) = (side(p.width), side(p.height));
    let kind = if p.channels == 1 { PixelType::U8 } else { PixelType::U8x3 };
    let src = FirImage::from_vec_u8(p.width as u32, p.height as u32, p.data, kind)
        .map_err(|e| anyhow!("thumbnail source: {e}"))?;
    let mut dst = FirImage::new(w as u32, h as u32, kind);
    Resizer::new()
        .resize(&src, &mut dst, &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)))
        .map_err(|e| anyhow!("thumbnail: {e}"))?;
    Ok(Pixels { width: w, height: h, channels: p.channels, data: dst.into_vec() })
}

/// HWC -> CHW.
pub fn hwc_to_chw(hwc: &[u8], size: usize) -> Vec<u8> {
    let n = size * size;
    let mut chw = vec![0u8; 3 * n];
    for i in 0..n {
        for c in 0..3 {
            chw[c * n + i] = hwc[i * 3 + c];
        }
    }
    chw
}

/// Crop to the reference box (the whole image when there is none, or an empty one) and resize:
/// `size x size` HWC RGB bytes and the box used.
fn crop_and_resize(p: &Pixels, size: usize) -> Result<(Vec<u8>, Option<CropBox>)> {
    if size == 0 {
        bail!("image size must be positive");
    }
    let crop_box = p.crop_box().filter(|b| b[2] > b[0] && b[3] > b[1]);
    let hwc = resize_rgb(&p.crop_rgb(crop_box.unwrap_or([0, 0, p.width, p.height])), size)?;
    Ok((hwc, crop_box))
}

/// The whole reference pipeline on decoded pixels.
pub fn preprocess(p: &Pixels, size: usize) -> Result<Preprocessed> {
    let (hwc, crop_box) = crop_and_resize(p, size)?;
    Ok(Preprocessed { chw_u8: hwc_to_chw(&hwc, size), size, crop_box })
}

/// `v as f32 / 255.0` for every byte: the reference's `ToTensor` values, looked up instead of divided.
static UNIT: std::sync::LazyLock<[f32; 256]> = std::sync::LazyLock::new(|| std::array::from_fn(|v| v as f32 / 255.0));

/// Model-input floats from CHW u8 (exactly the reference's `ToTensor`: `u8 as f32 / 255`).
pub fn to_unit_floats(chw_u8: &[u8]) -> Vec<f32> {
    chw_u8.iter().map(|&v| UNIT[v as usize]).collect()
}

/// The whole pipeline straight to model-input floats `[3, S, S]` (the loader's hot path: no
/// intermediate CHW bytes). Returns the floats and the crop box used.
pub fn preprocess_floats(p: &Pixels, size: usize) -> Result<(Vec<f32>, Option<CropBox>)> {
    let (hwc, crop_box) = crop_and_resize(p, size)?;
    let n = size * size;
    let mut out = vec![0f32; 3 * n];
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        r[i] = UNIT[px[0] as usize];
        g[i] = UNIT[px[1] as usize];
        b[i] = UNIT[px[2] as usize];
    }
    Ok((out, crop_box))
}

/// Training-time augmentation that keeps what a caption says (issue 35): no colour change, only
/// where the garment sits. The reference has none; a catalogue of a few thousand products is
/// memorised without it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augment {
    /// Smallest share of the (reference-cropped) image's area a random crop keeps; 1 = no crop.
    pub min_scale: f64,
    /// Mirror left-right half the time.
    pub flip: bool,
}

impl Augment {
    /// A random square-ish crop of `b` (area share in `[min_scale, 1]`, aspect within 3:4..4:3 of
    /// the box's) at a random place, drawn from `rng`.
    pub fn crop(&self, b: CropBox, rng: &mut impl rand::Rng) -> CropBox {
        if self.min_scale >= 1.0 {
            return b;
        }
        let [l, t, r, bt] = b;
        let (w, h) = ((r - l) as f64, (bt - t) as f64);
        let scale = rng.random_range(self.min_scale.clamp(0.05, 1.0)..=1.0);
        let aspect = rng.random_range((3.0f64 / 4.0).ln()..=(4.0f64 / 3.0).ln()).exp();
        let cw = ((w * (scale * aspect).sqrt()).round() as usize).clamp(1, r - l);
        let ch = ((h * (scale / aspect).sqrt()).round() as usize).clamp(1, bt - t);
        let x = l + rng.random_range(0..=(r - l - cw));
        let y = t + rng.random_range(0..=(bt - t - ch));
        [x, y, x + cw, y + ch]
    }
}

/// Model-input floats of `p` with `aug` applied to the reference crop: the training loader's path
/// when a recipe asks for augmentation. Returns the floats and the reference's box (not the
/// random crop), as [`preprocess_floats`] does.
pub fn augmented_floats(
    p: &Pixels,
    size: usize,
    aug: &Augment,
    rng: &mut impl rand::Rng,
) -> Result<(Vec<f32>, Option<CropBox>)> {
    if size == 0 {
        bail!("image size must be positive");
    }
    let crop_box = p.crop_box().filter(|b| b[2] > b[0] && b[3] > b[1]);
    let region = aug.crop(crop_box.unwrap_or([0, 0, p.width, p.height]), rng);
    let mut hwc = resize_rgb(&p.crop_rgb(region), size)?;
    if aug.flip && rng.random_bool(0.5) {
        for row in hwc.chunks_exact_mut(size * 3) {
            for x in 0..size / 2 {
                for c in 0..3 {
                    row.swap(x * 3 + c, (size - 1 - x) * 3 + c);
                }
            }
        }
    }
    Ok((to_unit_floats(&hwc_to_chw(&hwc, size)), crop_box))
}

/// Value the reference writes into masked pixels.
pub const MASKED_PIXEL: f32 = 1e-6;

/// The masked-image-reconstruction mask: a `grid x grid` split of the image with exactly half the
/// cells (rounded down) chosen uniformly at random, seeded. Returns one flag per cell, row-major,
/// `true` = masked. (The reference's generator has a sliding-window quirk that correlates rows; the
/// spec asks for the intended uniform mask.)
pub fn grid_mask(grid: usize, rng: &mut impl rand::Rng) -> Vec<bool> {
    use rand::seq::SliceRandom;
    let n = grid * grid;
    let mut cells: Vec<usize> = (0..n).collect();
    cells.shuffle(rng);
    let mut mask = vec![false; n];
    for &c in &cells[..n / 2] {
        mask[c] = true;
    }
    mask
}

/// Set the pixels of masked cells of a `[3, size, size]` CHW image to [`MASKED_PIXEL`].
pub fn apply_grid_mask(chw: &mut [f32], size: usize, grid: usize, mask: &[bool]) -> Result<()> {
    if grid == 0 || !size.is_multiple_of(grid) {
        bail!("image size {size} is not divisible into a {grid}x{grid} mask grid");
    }
    let cell = size / grid;
    for (k, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let (cy, cx) = (k / grid, k % grid);
        for c in 0..3 {
            for y in cy * cell..(cy + 1) * cell {
                let row = c * size * size + y * size;
                chw[row + cx * cell..row + (cx + 1) * cell].fill(MASKED_PIXEL);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Crops stay inside the box with at least the asked share (within rounding and the aspect
    /// jitter); a flip mirrors the row; the same seed gives the same augmentation.
    #[test]
    fn augmentation_crops_inside_the_box_and_flips() {
        use rand::SeedableRng;
        let aug = Augment { min_scale: 0.5, flip: true };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..200 {
            let [l, t, r, b] = aug.crop([10, 20, 110, 220], &mut rng);
            assert!(l >= 10 && t >= 20 && r <= 110 && b <= 220 && r > l && b > t, "{l} {t} {r} {b}");
            let share = ((r - l) * (b - t)) as f64 / (100.0 * 200.0);
            assert!(share >= 0.5 * 0.75 - 0.02, "{share}");
        }
        // A left-to-right ramp, no black pixel: the whole image is the box.
        let (w, h) = (8, 8);
        let data: Vec<u8> = (0..w * h).flat_map(|i| [(100 + (i % w) * 20) as u8; 3]).collect();
        let p = Pixels::from_hwc_rgb(w, h, data);
        let whole = Augment { min_scale: 1.0, flip: true };
        let (plain, _) = preprocess_floats(&p, 8).unwrap();
        let mut seen_flip = false;
        for seed in 0..20 {
            let (x, _) = augmented_floats(&p, 8, &whole, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed)).unwrap();
            let again = augmented_floats(&p, 8, &whole, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed)).unwrap().0;
            assert_eq!(x, again);
            if x != plain {
                seen_flip = true;
                // Mirrored: the first row's first value is the plain first row's last.
                assert_eq!(x[0], plain[7]);
            }
        }
        assert!(seen_flip, "half the draws flip");
    }

    #[test]
    fn grid_mask_masks_half_the_cells_seeded() {
        use rand::SeedableRng;
        let m = grid_mask(16, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3));
        assert_eq!(m.iter().filter(|&&b| b).count(), 128);
        assert_eq!(m, grid_mask(16, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3)));
        assert_ne!(m, grid_mask(16, &mut rand_chacha::ChaCha8Rng::seed_from_u64(4)));
        let mut img = vec![0.5f32; 3 * 32 * 32];
        apply_grid_mask(&mut img, 32, 16, &m).unwrap();
        assert_eq!(img.iter().filter(|&&v| v == MASKED_PIXEL).count(), 3 * 128 * 4);
        assert!(apply_grid_mask(&mut img, 30, 16, &m).is_err());
    }

    #[test]
    fn white_image_has_no_box_and_uses_the_whole_image() {
        let p = Pixels::from_hwc_rgb(40, 30, vec![255; 40 * 30 * 3]);
        assert_eq!(p.crop_box(), None);
        let out = preprocess(&p, 32).unwrap();
        assert_eq!(out.crop_box, None);
        assert_eq!(out.chw_u8.len(), 3 * 32 * 32);
        assert!(out.chw_u8.iter().all(|&v| v == 255));
        // An off-white background is not white to the dither: error diffusion scatters black dots.
        assert!(Pixels::from_hwc_rgb(40, 30, vec![250; 40 * 30 * 3]).crop_box().is_some());
    }

    #[test]
    fn one_pixel_and_single_column_boxes_fall_back_to_the_whole_image() {
        let mut p = Pixels::from_hwc_rgb(1, 1, vec![0, 0, 0]);
        assert_eq!(preprocess(&p, 8).unwrap().crop_box, None);
        p = Pixels::from_hwc_rgb(5, 5, vec![255; 75]);
        for y in 0..5 {
            p.data[(y * 5 + 2) * 3..(y * 5 + 2) * 3 + 3].copy_from_slice(&[0, 0, 0]);
        }
        // Box [2,0,2,4] has zero width (exclusive right edge): the reference would crash.
        assert_eq!(p.crop_box(), Some([2, 0, 2, 4]));
        assert_eq!(preprocess(&p, 8).unwrap().crop_box, None);
    }

    #[test]
    fn corrupt_and_empty_files_are_errors() {
        assert!(Pixels::decode(b"not an image").unwrap_err().to_string().contains("cannot decode"));
        assert!(Pixels::decode(&[]).is_err());
    }

    /// A PNG whose iCCP chunk (an ICC profile, read with the header) inflates to 1 GiB from
    /// about 1 MB: the decoder inflates it only up to the header cap, drops the profile (which
    /// this pipeline never uses) and decodes the pixels. The server's peak memory under such
    /// uploads is measured by `scripts/hostile_probe.py`.
    #[test]
    fn an_iccp_bomb_is_inflated_only_up_to_the_header_cap() {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(vec![], flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            z.write_all(&zeros).unwrap();
        }
        let mut iccp = b"icc\0\0".to_vec();
        iccp.extend(z.finish().unwrap());
        let mut png = Pixels::from_hwc_rgb(2, 1, vec![10, 20, 30, 40, 50, 60]).to_png().unwrap();
        let chunk = |kind: &[u8], data: &[u8]| -> Vec<u8> {
            let mut c = (data.len() as u32).to_be_bytes().to_vec();
            let body: Vec<u8> = kind.iter().chain(data).copied().collect();
            c.extend(&body);
            c.extend(crc32fast::hash(&body).to_be_bytes());
            c
        };
        // After the signature (8 bytes) and IHDR (25).
        png.splice(33..33, chunk(b"iCCP", &iccp));
        assert!(png.len() < 8 << 20, "{} bytes", png.len());
        let p = Pixels::decode(&png).unwrap();
        assert_eq!((p.width, p.height, p.data), (2, 1, vec![10, 20, 30, 40, 50, 60]));
    }

    #[test]
    fn dark_garment_on_white_gets_a_tight_box() {
        let mut p = Pixels::from_hwc_rgb(20, 20, vec![255; 20 * 20 * 3]);
        for y in 5..12 {
            for x in 3..9 {
                p.data[(y * 20 + x) * 3..(y * 20 + x) * 3 + 3].copy_from_slice(&[10, 10, 40]);
            }
        }
        assert_eq!(p.crop_box(), Some([3, 5, 8, 11]));
    }

    /// PNG round trip keeps grey images grey and RGB images RGB (the server's catalogue images).
    #[test]
    fn png_round_trip_keeps_channels() {
        for channels in [1, 3] {
            let p = Pixels { width: 3, height: 2, channels, data: (0..6 * channels as u8).map(|v| v * 7).collect() };
            let back = Pixels::decode(&p.to_png().unwrap()).unwrap();
            assert_eq!((back.width, back.height, back.channels), (3, 2, channels));
            assert_eq!(back.data, p.data);
        }
    }
}
