//! PNG grids of images: how a person sees samples, clusters and shards.

use std::path::Path;

use crate::error::{Error, Result};

/// Write `images` (each `u8` `[C, H, W]`, C = 1 or 3) as a PNG grid with `cols` columns, a
/// `pad`-pixel border between cells (value `bg`). Rows may be ragged: `None` leaves a cell blank.
/// Written atomically.
pub fn write_grid_png(
    path: &Path,
    images: &[Option<&[u8]>],
    shape: [usize; 3],
    cols: usize,
    pad: usize,
    bg: u8,
) -> Result<()> {
    let [c, h, w] = shape;
    if c != 1 && c != 3 {
        return Err(Error::InvalidConfig(format!(
            "{}: grids take 1- or 3-channel images, got {c} channels",
            path.display()
        )));
    }
    let cols = cols.max(1);
    let rows = images.len().div_ceil(cols).max(1);
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let mut buf = vec![bg; gw * gh * 3];
    for (idx, img) in images.iter().enumerate() {
        let Some(img) = img else { continue };
        let (r, col) = (idx / cols, idx % cols);
        let (y0, x0) = (pad + r * (h + pad), pad + col * (w + pad));
        for y in 0..h {
            for x in 0..w {
                for ch in 0..3 {
                    let src = if c == 1 {
                        img[y * w + x]
                    } else {
                        img[ch * h * w + y * w + x]
                    };
                    buf[((y0 + y) * gw + x0 + x) * 3 + ch] = src;
                }
            }
        }
    }
    write_rgb_png(path, &buf, gw, gh)
}

/// Write an RGB8 buffer (`w * h * 3` bytes, row-major) as a PNG, atomically.
pub fn write_rgb_png(path: &Path, rgb: &[u8], w: usize, h: usize) -> Result<()> {
    let encoded = encode_rgb(rgb, w, h)
        .map_err(|e| Error::InvalidConfig(format!("{}: cannot encode PNG: {e}", path.display())))?;
    crate::fsio::write_bytes_atomic(path, &encoded)
}

fn encode_rgb(rgb: &[u8], w: usize, h: usize) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w as u32, h as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

/// Map values in [-1, 1] to bytes (clamped): how generated samples become pixels.
pub fn to_u8(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .map(|&v| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8)
        .collect()
}
