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

use super::loss::Targets;
use crate::data::loader::Batch;
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
pub fn partners(sim: &[f32], itm_labels: &[i64], products: &[String], rng: &mut ChaCha8Rng) -> Vec<Option<usize>> {
    let n = itm_labels.len();
    assert_eq!(sim.len(), n * n, "similarities of {n} rows");
    (0..n)
        .map(|i| {
            if itm_labels[i] != 0 {
                return None;
            }
            let eligible: Vec<usize> = (0..n).filter(|&j| itm_labels[j] == 1 && products[j] != products[i]).collect();
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

/// Give each negative row of `batch` its partner's (MLM-corrupted) caption. Its MLM labels become
/// the partner's when `mlm_on_negatives` (predict that caption's masked words from this image, as
/// the reference does on its negatives), otherwise [`IGNORE`]. Returns how many rows changed.
pub fn swap_captions(batch: &mut Batch, partners: &[Option<usize>], mlm_on_negatives: bool) -> usize {
    let t = batch.text_len;
    let mut changed = 0;
    for (i, p) in partners.iter().enumerate() {
        let Some(j) = *p else { continue };
        let (ids, labels) =
            (batch.input_ids[j * t..(j + 1) * t].to_vec(), batch.mlm_labels[j * t..(j + 1) * t].to_vec());
        batch.input_ids[i * t..(i + 1) * t].copy_from_slice(&ids);
        if mlm_on_negatives {
            batch.mlm_labels[i * t..(i + 1) * t].copy_from_slice(&labels);
        } else {
            batch.mlm_labels[i * t..(i + 1) * t].fill(IGNORE);
        }
        changed += 1;
    }
    changed
}

/// Whether a batch can be mined: it carries the product ids and own captions that ITC needs.
pub fn minable<B: burn::tensor::backend::Backend>(batch: &Batch, targets: &Targets<B>) -> bool {
    targets.itc.is_some() && batch.product_ids.len() == batch.len()
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
            let p = partners(&sim, &labels, &products, &mut rng(seed, 0, 0));
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
        let draws: Vec<_> = (0..200).map(|k| partners(&sim, &labels, &products, &mut rng(7, 1, k))[0]).collect();
        let to2 = draws.iter().filter(|d| **d == Some(2)).count();
        assert!(to2 > 190, "exp(8) : 1 odds, drew caption 2 {to2} times in 200");
        let again: Vec<_> = (0..200).map(|k| partners(&sim, &labels, &products, &mut rng(7, 1, k))[0]).collect();
        assert_eq!(draws, again, "the same seed draws the same partners");
    }

    #[test]
    fn a_negative_without_partner_keeps_its_caption() {
        let p = partners(&[0.0; 4], &[0, 1], &ids(&["a", "a"]), &mut rng(0, 0, 0));
        assert_eq!(p, vec![None, None]);
    }

    #[test]
    fn swapping_moves_ids_and_labels() {
        let mut b = Batch {
            indices: vec![0, 1],
            images: vec![],
            masked_images: vec![],
            input_ids: vec![1, 2, 3, 4, 5, 6],
            mlm_labels: vec![IGNORE, 9, IGNORE, IGNORE, IGNORE, 8],
            itm_labels: vec![0, 1],
            sup_labels: vec![],
            sub_labels: vec![],
            caption_ids: vec![],
            product_ids: vec![],
            empty_caption: [101, 102],
            image_size: 4,
            text_len: 3,
        };
        let mut c = b.clone();
        assert_eq!(swap_captions(&mut b, &[Some(1), None], true), 1);
        assert_eq!(b.input_ids, vec![4, 5, 6, 4, 5, 6]);
        assert_eq!(b.mlm_labels, vec![IGNORE, IGNORE, 8, IGNORE, IGNORE, 8]);
        swap_captions(&mut c, &[Some(1), None], false);
        assert_eq!(c.mlm_labels, vec![IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 8]);
    }
}
