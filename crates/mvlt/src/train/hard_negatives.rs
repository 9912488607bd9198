//! ITM negatives mined from the contrastive similarities (ALBEF's hard negatives, ours; off in the
//! authors' recipes).
//!
//! The reference pairs an ITM negative's image with a random other product's caption. Most such
//! pairs differ in the garment and the colour at once, so ITM can separate them from one word and
//! stops improving long before it ranks 100 candidates well. With `itm_hard_negatives`, each
//! negative row instead takes the caption of another row of the batch, drawn with probability
//! proportional to `exp(similarity)` of its image to that caption under the ITC head (ALBEF,
//! Li et al. 2021, section 3.2): captions the image already resembles, which ITM must then tell
//! apart by the words that differ.

use crate::data::text::IGNORE;
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// For each row, the row whose caption it takes: `Some(j)` for an ITM negative (label 0) given
/// row `j`'s caption, where `j` is a matched pair (label 1) of another product, drawn with
/// probability proportional to `exp(sim[i][j])`. `None` for matched rows and for a negative with
/// no such partner in the batch (it keeps its random caption).
///
/// `sim` is `[n, n]` row-major: image `i` against caption `j`, already multiplied by the ITC scale.
/// `captions` (`[n, text_len]`, each row's own caption ids; empty to skip the check): a caption
/// identical to the image's own (a shop's title shared by several products) is no negative, and
/// the one the similarity favours most, so it is never drawn.
pub fn partners(
    sim: &[f32],
    itm_labels: &[i64],
    products: &[String],
    captions: &[i64],
    rng: &mut ChaCha8Rng,
) -> Vec<Option<usize>> {
    let n = itm_labels.len();
    assert_eq!(sim.len(), n * n, "similarities of {n} rows");
    let t = captions.len().checked_div(n).unwrap_or(0);
    let same_caption = |i: usize, j: usize| t > 0 && captions[i * t..(i + 1) * t] == captions[j * t..(j + 1) * t];
    (0..n)
        .map(|i| {
            if itm_labels[i] != 0 {
                return None;
            }
            let eligible: Vec<usize> =
                (0..n).filter(|&j| itm_labels[j] == 1 && products[j] != products[i] && !same_caption(i, j)).collect();
            let row = &sim[i * n..(i + 1) * n];
            // Softmax weights, shifted by the row's maximum so that exp cannot overflow.
            let top = eligible.iter().map(|&j| row[j]).fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f64> = eligible.iter().map(|&j| f64::from(row[j] - top).exp()).collect();
            let pick = WeightedIndex::new(&weights).ok()?;
            Some(eligible[pick.sample(rng)])
        })
        .collect()
}

/// The RNG of one micro-batch's draw: a function of the run's seed and the batch's place in it,
/// so that a resumed run draws the same partners.
pub fn rng(seed: u64, epoch: usize, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0x0048_4152_444E_4547_u64 ^ ((epoch as u64) << 32) ^ index as u64)
}

/// Give each negative row its partner's (MLM-corrupted) caption: `input_ids` and `mlm_labels`
/// are a batch's `[B, T]` arrays, `text_len` T. The row's MLM labels become the partner's when
/// `mlm_on_negatives` (predict that caption's masked words from this image, as the reference does
/// on its negatives), otherwise [`IGNORE`]. Returns how many rows changed.
pub fn swap_captions(
    input_ids: &mut [i64],
    mlm_labels: &mut [i64],
    text_len: usize,
    partners: &[Option<usize>],
    mlm_on_negatives: bool,
) -> usize {
    let t = text_len;
    let mut changed = 0;
    for (i, p) in partners.iter().enumerate() {
        let Some(j) = *p else { continue };
        input_ids.copy_within(j * t..(j + 1) * t, i * t);
        if mlm_on_negatives {
            mlm_labels.copy_within(j * t..(j + 1) * t, i * t);
        } else {
            mlm_labels[i * t..(i + 1) * t].fill(IGNORE);
        }
        changed += 1;
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn negatives_take_a_matched_caption_of_another_product() {
        // Rows 0 and 2 are negatives; rows 1, 3 matched; row 3 is the same product as row 2.
        let labels = [0, 1, 0, 1];
        let products = ids(&["a", "b", "c", "c"]);
        let sim = vec![0.0; 16];
        for seed in 0..20 {
            let p = partners(&sim, &labels, &products, &[], &mut rng(seed, 0, 0));
            assert_eq!(p[1], None);
            assert_eq!(p[3], None);
            assert!(matches!(p[0], Some(1) | Some(3)), "{p:?}");
            // Row 3 is row 2's own product: not a negative for it.
            assert_eq!(p[2], Some(1), "{p:?}");
        }
    }

    #[test]
    fn the_draw_follows_the_similarity_and_the_seed() {
        let labels = [0, 1, 1];
        let products = ids(&["a", "b", "c"]);
        // Image 0 resembles caption 2 far more than caption 1.
        let sim = vec![0.0, 0.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let draws: Vec<_> = (0..200).map(|k| partners(&sim, &labels, &products, &[], &mut rng(7, 1, k))[0]).collect();
        let to2 = draws.iter().filter(|d| **d == Some(2)).count();
        assert!(to2 > 190, "exp(8) : 1 odds, drew caption 2 {to2} times in 200");
        let again: Vec<_> = (0..200).map(|k| partners(&sim, &labels, &products, &[], &mut rng(7, 1, k))[0]).collect();
        assert_eq!(draws, again, "the same seed draws the same partners");
    }

    /// Row 1's caption is row 0's own (another product, the same shop title): not a negative.
    #[test]
    fn a_caption_identical_to_the_image_s_own_is_never_drawn() {
        let labels = [0, 1, 1];
        let products = ids(&["a", "b", "c"]);
        let captions = [5, 6, 5, 6, 7, 8];
        let sim = vec![0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        for k in 0..50 {
            assert_eq!(partners(&sim, &labels, &products, &captions, &mut rng(3, 0, k))[0], Some(2));
        }
    }

    #[test]
    fn a_negative_without_partner_keeps_its_caption() {
        let p = partners(&[0.0; 4], &[0, 1], &ids(&["a", "a"]), &[], &mut rng(0, 0, 0));
        assert_eq!(p, vec![None, None]);
    }

    #[test]
    fn swapping_moves_ids_and_labels() {
        let (mut ids, mut labels) = (vec![1, 2, 3, 4, 5, 6], vec![IGNORE, 9, IGNORE, IGNORE, IGNORE, 8]);
        let (mut ids2, mut labels2) = (ids.clone(), labels.clone());
        assert_eq!(swap_captions(&mut ids, &mut labels, 3, &[Some(1), None], true), 1);
        assert_eq!(ids, vec![4, 5, 6, 4, 5, 6]);
        assert_eq!(labels, vec![IGNORE, IGNORE, 8, IGNORE, IGNORE, 8]);
        swap_captions(&mut ids2, &mut labels2, 3, &[Some(1), None], false);
        assert_eq!(ids2, vec![4, 5, 6, 4, 5, 6]);
        assert_eq!(labels2, vec![IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 8]);
    }
}
