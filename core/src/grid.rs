//! PNG grids of images: how a person sees samples, clusters and shards.

use std::path::Path;

use crate::error::{Error, Result};

/// DejaVu Sans (its licence: core/assets/DejaVuSans-LICENSE), embedded so grids and plots have
/// text on machines without fonts.
pub const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// How a grid is drawn: columns, borders, the upscaling of each cell and the labels.
#[derive(Debug, Clone)]
pub struct Layout {
    pub cols: usize,
    /// Pixels between cells and around the grid (value `bg`).
    pub pad: usize,
    pub bg: u8,
    /// Every image pixel is drawn as `scale` x `scale` pixels (nearest neighbour).
    pub scale: usize,
    /// A label over each column (a class-balanced grid: the class names); empty: none.
    pub col_labels: Vec<String>,
    /// A label left of each row (a partition grid: the clusters); empty: none.
    pub row_labels: Vec<String>,
}

impl Layout {
    /// `cols` columns, 2-pixel dark borders, no upscaling, no labels.
    pub fn plain(cols: usize) -> Self {
        Self {
            cols,
            pad: 2,
            bg: 40,
            scale: 1,
            col_labels: vec![],
            row_labels: vec![],
        }
    }

    /// The same, with cells upscaled to be seen (see [`display_scale`]).
    pub fn for_people(cols: usize, image_height: usize) -> Self {
        Self {
            scale: display_scale(image_height),
            ..Self::plain(cols)
        }
    }
}

/// The upscaling that makes an image of `height` pixels about 90 pixels high on a screen (a
/// 28-pixel image: 3), at most 4 and at least 1.
pub fn display_scale(height: usize) -> usize {
    (96 / height.max(1)).clamp(1, 4)
}

/// Label text height in pixels.
const LABEL_PX: f32 = 14.0;

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
    let layout = Layout {
        pad,
        bg,
        ..Layout::plain(cols)
    };
    write_grid_png_with(path, images, shape, &layout)
}

/// [`write_grid_png`] with upscaled cells and labels (`layout`).
pub fn write_grid_png_with(
    path: &Path,
    images: &[Option<&[u8]>],
    shape: [usize; 3],
    layout: &Layout,
) -> Result<()> {
    let [c, _, _] = shape;
    if c != 1 && c != 3 {
        return Err(Error::InvalidConfig(format!(
            "{}: grids take 1- or 3-channel images, got {c} channels",
            path.display()
        )));
    }
    let (buf, gw, gh) = draw_grid(images, shape, layout);
    write_rgb_png(path, &buf, gw, gh)
}

/// The grid as an RGB8 buffer and its width and height.
fn draw_grid(images: &[Option<&[u8]>], [c, h, w]: [usize; 3], l: &Layout) -> (Vec<u8>, usize, usize) {
    let (cols, pad, s) = (l.cols.max(1), l.pad, l.scale.max(1));
    let rows = images.len().div_ceil(cols).max(1);
    let (cw, ch) = (w * s, h * s); // a cell's size on screen
    let top = if l.col_labels.is_empty() {
        0
    } else {
        LABEL_PX as usize + 8
    };
    let left = match l
        .row_labels
        .iter()
        .map(|t| text_width(t, LABEL_PX))
        .reduce(f32::max)
    {
        Some(width) => width.ceil() as usize + 10,
        None => 0,
    };
    let (gw, gh) = (left + cols * (cw + pad) + pad, top + rows * (ch + pad) + pad);
    let mut buf = vec![l.bg; gw * gh * 3];
    for (idx, img) in images.iter().enumerate() {
        let Some(img) = img else { continue };
        let (r, col) = (idx / cols, idx % cols);
        let (y0, x0) = (top + pad + r * (ch + pad), left + pad + col * (cw + pad));
        for y in 0..ch {
            for x in 0..cw {
                let (sy, sx) = (y / s, x / s);
                for k in 0..3 {
                    let src = if c == 1 {
                        img[sy * w + sx]
                    } else {
                        img[k * h * w + sy * w + sx]
                    };
                    buf[((y0 + y) * gw + x0 + x) * 3 + k] = src;
                }
            }
        }
    }
    let mut canvas = Canvas {
        buf: &mut buf,
        w: gw,
        h: gh,
    };
    for (col, text) in l.col_labels.iter().enumerate().take(cols) {
        let (x0, width) = ((left + pad + col * (cw + pad)) as f32, cw as f32);
        canvas.text_centered(text, x0, width, (top - 6) as f32);
    }
    for (r, text) in l.row_labels.iter().enumerate().take(rows) {
        let baseline = (top + pad + r * (ch + pad) + ch / 2) as f32 + LABEL_PX / 3.0;
        canvas.text(text, 5.0, baseline, LABEL_PX);
    }
    (buf, gw, gh)
}

/// Light text on an RGB8 buffer.
struct Canvas<'a> {
    buf: &'a mut [u8],
    w: usize,
    h: usize,
}

impl Canvas<'_> {
    /// `text` centred in `[x0, x0 + width]`, made smaller (down to 9 pixels), then cut, to fit.
    fn text_centered(&mut self, text: &str, x0: f32, width: f32, baseline: f32) {
        let mut px = LABEL_PX;
        while px > 9.0 && text_width(text, px) > width {
            px -= 1.0;
        }
        let mut t: String = text.to_string();
        while !t.is_empty() && text_width(&t, px) > width {
            t.pop();
        }
        let tw = text_width(&t, px);
        self.text(&t, x0 + (width - tw) / 2.0, baseline, px);
    }

    /// `text` from `x` on the baseline `baseline`, `px` pixels high, anti-aliased.
    fn text(&mut self, text: &str, x: f32, baseline: f32, px: f32) {
        use ab_glyph::{Font, ScaleFont, point};
        let font = font();
        let scaled = font.as_scaled(px);
        let mut caret = x;
        for ch in text.chars() {
            let id = scaled.glyph_id(ch);
            let glyph = id.with_scale_and_position(px, point(caret, baseline));
            caret += scaled.h_advance(id);
            let Some(outline) = font.outline_glyph(glyph) else {
                continue;
            };
            let b = outline.px_bounds();
            outline.draw(|gx, gy, coverage| {
                let (x, y) = (b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64);
                if (0..self.w as i64).contains(&x) && (0..self.h as i64).contains(&y) {
                    let i = (y as usize * self.w + x as usize) * 3;
                    for v in &mut self.buf[i..i + 3] {
                        *v = (*v as f32 + coverage.min(1.0) * (235.0 - *v as f32)).round() as u8;
                    }
                }
            });
        }
    }
}

fn font() -> ab_glyph::FontRef<'static> {
    ab_glyph::FontRef::try_from_slice(FONT).expect("the embedded DejaVu Sans parses")
}

/// The width in pixels of `text` set `px` pixels high.
fn text_width(text: &str, px: f32) -> f32 {
    use ab_glyph::{Font, ScaleFont};
    let font = font();
    let scaled = font.as_scaled(px);
    text.chars().map(|c| scaled.h_advance(scaled.glyph_id(c))).sum()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two 2x3 images: pixel values 0..6 and 100..106.
    fn images() -> (Vec<u8>, Vec<u8>) {
        ((0..6).collect(), (100..106).collect())
    }

    #[test]
    fn upscaled_cells_repeat_each_pixel() {
        let (a, b) = images();
        let layout = Layout {
            scale: 3,
            ..Layout::plain(2)
        };
        let (buf, w, h) = draw_grid(&[Some(&a), Some(&b)], [1, 2, 3], &layout);
        assert_eq!((w, h), (2 + 2 * (9 + 2), 2 + 6 + 2));
        let px = |x: usize, y: usize| buf[(y * w + x) * 3];
        for y in 0..6 {
            for x in 0..9 {
                assert_eq!(px(2 + x, 2 + y), a[(y / 3) * 3 + x / 3], "cell 0 at ({x}, {y})");
                assert_eq!(px(13 + x, 2 + y), b[(y / 3) * 3 + x / 3], "cell 1 at ({x}, {y})");
            }
        }
        assert_eq!(px(0, 0), 40, "the border keeps the background");
    }

    #[test]
    fn labels_take_their_own_band_and_leave_the_cells_alone() {
        let (a, b) = images();
        let plain = draw_grid(
            &[Some(&a), Some(&b)],
            [1, 2, 3],
            &Layout {
                scale: 10,
                ..Layout::plain(2)
            },
        );
        let layout = Layout {
            scale: 10,
            col_labels: vec!["Trouser".into(), "a label far too long for its column".into()],
            row_labels: vec!["cluster 0".into()],
            ..Layout::plain(2)
        };
        let (buf, w, h) = draw_grid(&[Some(&a), Some(&b)], [1, 2, 3], &layout);
        let (top, left) = (h - plain.2, w - plain.1);
        assert!(
            top >= LABEL_PX as usize && left > 30,
            "bands: top {top}, left {left}"
        );
        // The label bands hold light text; every cell pixel is the one drawn without labels.
        let lit = |x0: usize, x1: usize, y0: usize, y1: usize| {
            (y0..y1)
                .flat_map(|y| (x0..x1).map(move |x| (x, y)))
                .filter(|&(x, y)| buf[(y * w + x) * 3] > 150)
                .count()
        };
        let col = 30 + 2; // one cell and its border
        assert!(lit(left + 2, left + col, 0, top) > 10, "column 0's label");
        assert!(
            lit(left + 2 + col, w, 0, top) > 10,
            "column 1's label, shortened to fit"
        );
        assert_eq!(
            lit(left + col + 2 + 30, w, 0, top),
            0,
            "no label spills past its column"
        );
        assert!(lit(0, left, top, h) > 10, "the row label");
        for y in 0..plain.2 {
            for x in 0..plain.1 {
                let i = ((top + y) * w + left + x) * 3;
                assert_eq!(buf[i], plain.0[(y * plain.1 + x) * 3], "({x}, {y})");
            }
        }
    }

    #[test]
    fn a_grid_of_people_sized_cells_is_about_90_pixels() {
        assert_eq!(display_scale(28), 3);
        assert_eq!(display_scale(32), 3);
        assert_eq!(display_scale(8), 4);
        assert_eq!(display_scale(256), 1);
    }
}
