//! The 3-D position index of a Qwen2.5-VL prompt (transformers' `get_rope_index` for images):
//! a text token's time, height and width positions are all its running index; an image's tokens
//! take `start + (t, row, column)` over its merged grid, and the text after it resumes at
//! `start + max(rows, columns)`. Generated tokens continue from `len + delta`, where `delta` is
//! the largest position plus one minus the prompt length.

use super::vision::Grid;

/// Positions `[time, height, width]` for each prompt token, and the delta decoding adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPositions {
    pub axes: [Vec<i64>; 3],
    pub delta: i64,
}

impl PromptPositions {
    /// The position (same on all three axes) of the token at index `index` past the prompt's
    /// start, for `index >= prompt length`.
    pub fn decode_position(&self, index: i64) -> i64 {
        index + self.delta
    }
}

/// Computes the positions of `ids`, whose image placeholders (`image_token_id`, already
/// expanded to each image's token count) belong to `grids` in order.
pub fn prompt_positions(
    ids: &[i64],
    grids: &[Grid],
    image_token_id: i64,
    merge: i64,
) -> Result<PromptPositions, String> {
    let placeholders = ids.iter().filter(|&&t| t == image_token_id).count() as i64;
    let needed: i64 = grids.iter().map(|g| g.tokens(merge)).sum();
    if placeholders != needed {
        return Err(format!(
            "the prompt holds {placeholders} image placeholder tokens but its {} image(s) need \
             {needed}",
            grids.len()
        ));
    }
    let mut axes: [Vec<i64>; 3] = std::array::from_fn(|_| Vec::with_capacity(ids.len()));
    let mut grids = grids.iter();
    let mut next = 0i64;
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != image_token_id {
            for axis in &mut axes {
                axis.push(next);
            }
            next += 1;
            i += 1;
            continue;
        }
        let g = grids
            .next()
            .ok_or_else(|| "more image placeholders than images".to_owned())?;
        let (lh, lw) = (g.h / merge, g.w / merge);
        let count = (g.t * lh * lw) as usize;
        if ids[i..].len() < count || ids[i..i + count].iter().any(|&t| t != image_token_id) {
            return Err(format!(
                "an image's placeholder run at token {i} is shorter than its {count} tokens"
            ));
        }
        for t in 0..g.t {
            for y in 0..lh {
                for x in 0..lw {
                    axes[0].push(next + t);
                    axes[1].push(next + y);
                    axes[2].push(next + x);
                }
            }
        }
        next += lh.max(lw);
        i += count;
    }
    let max = axes
        .iter()
        .flat_map(|a| a.iter().copied())
        .max()
        .unwrap_or(-1);
    Ok(PromptPositions {
        delta: max + 1 - ids.len() as i64,
        axes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_tokens_take_grid_positions_and_text_resumes_after_the_longer_side() {
        const IMG: i64 = 9;
        // text, 2×3 merged grid (grid 4×6 patches), text.
        let ids = [1, 2, IMG, IMG, IMG, IMG, IMG, IMG, 3];
        let p = prompt_positions(&ids, &[Grid { t: 1, h: 4, w: 6 }], IMG, 2).unwrap();
        assert_eq!(p.axes[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5]);
        assert_eq!(p.axes[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5]);
        assert_eq!(p.axes[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5]);
        assert_eq!(p.delta, 6 - 9);
        assert_eq!(p.decode_position(9), 6);
    }

    #[test]
    fn a_count_mismatch_is_refused() {
        let err = prompt_positions(&[9, 9, 1], &[Grid { t: 1, h: 4, w: 4 }], 9, 2).unwrap_err();
        assert!(err.contains("2 image placeholder tokens"), "{err}");
        let err = prompt_positions(&[9, 9], &[], 9, 2).unwrap_err();
        assert!(err.contains("0 image(s)"), "{err}");
    }
}
