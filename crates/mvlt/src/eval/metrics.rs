//! Classification metrics with scikit-learn's definitions, and retrieval recall.

use serde::Serialize;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClassStats {
    pub label: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// True instances of the class.
    pub support: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub micro_f1: f64,
    pub weighted_f1: f64,
    pub samples: usize,
    /// One row per label that occurs in the truth or the predictions (sklearn's default label set).
    pub per_class: Vec<ClassStats>,
}

/// `sklearn.metrics` semantics: labels are the sorted union of true and predicted labels; a
/// precision or recall with a zero denominator is 0 (`zero_division=0`, with its warning left out);
/// micro-F1 of single-label multiclass predictions equals accuracy; weighted-F1 weights each class by
/// its support.
pub fn classification_report(y_true: &[usize], y_pred: &[usize]) -> Report {
    assert_eq!(y_true.len(), y_pred.len());
    let n = y_true.len();
    let mut labels: Vec<usize> = y_true.iter().chain(y_pred).copied().collect();
    labels.sort_unstable();
    labels.dedup();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_class: Vec<ClassStats> = labels
        .iter()
        .map(|&c| {
            let tp = y_true.iter().zip(y_pred).filter(|(t, p)| **t == c && **p == c).count();
            let predicted = y_pred.iter().filter(|p| **p == c).count();
            let support = y_true.iter().filter(|t| **t == c).count();
            let (precision, recall) = (ratio(tp, predicted), ratio(tp, support));
            let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
            ClassStats { label: c, precision, recall, f1, support }
        })
        .collect();
    let correct = y_true.iter().zip(y_pred).filter(|(t, p)| t == p).count();
    let accuracy = ratio(correct, n);
    let macro_f1 =
        if per_class.is_empty() { 0.0 } else { per_class.iter().map(|s| s.f1).sum::<f64>() / per_class.len() as f64 };
    let weighted_f1 =
        if n == 0 { 0.0 } else { per_class.iter().map(|s| s.f1 * s.support as f64).sum::<f64>() / n as f64 };
    Report { accuracy, macro_f1, micro_f1: accuracy, weighted_f1, samples: n, per_class }
}

/// `n x n` counts, rows = truth, columns = prediction.
pub fn confusion_matrix(y_true: &[usize], y_pred: &[usize], n: usize) -> Vec<Vec<usize>> {
    let mut m = vec![vec![0; n]; n];
    for (&t, &p) in y_true.iter().zip(y_pred) {
        if t < n && p < n {
            m[t][p] += 1;
        }
    }
    m
}

/// Rank of the positive (index 0) among `scores`, 0-based: the number of candidates scoring
/// strictly higher (a tie with the positive does not push it down).
pub fn rank_of_positive(scores: &[f32]) -> usize {
    scores.iter().skip(1).filter(|&&s| s > scores[0]).count()
}

/// Fraction of queries whose positive ranks within the top `k`.
pub fn recall_at(ranks: &[usize], k: usize) -> f64 {
    if ranks.is_empty() {
        return 0.0;
    }
    ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    /// Worked by hand (and equal to sklearn 1.x's f1_score on the same lists).
    #[test]
    fn f1_scores_by_hand() {
        let t = [0, 0, 1, 1, 2, 2];
        let p = [0, 1, 1, 1, 2, 0];
        let r = classification_report(&t, &p);
        // class 0: tp 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 1/2
        // class 1: tp 2, predicted 3, support 2 -> P 2/3, R 1, F1 0.8
        // class 2: tp 1, predicted 1, support 2 -> P 1, R 1/2, F1 2/3
        close(r.accuracy, 4.0 / 6.0);
        close(r.micro_f1, 4.0 / 6.0);
        close(r.macro_f1, (0.5 + 0.8 + 2.0 / 3.0) / 3.0);
        close(r.weighted_f1, (0.5 * 2.0 + 0.8 * 2.0 + 2.0 / 3.0 * 2.0) / 6.0);
    }

    /// A class that is never predicted (F1 0, counted in macro) and a predicted class with no true
    /// instance (support 0: counted in macro with F1 0, weight 0 in weighted).
    #[test]
    fn classes_absent_from_predictions_or_truth() {
        let t = [0, 0, 1, 2];
        let p = [0, 0, 0, 3];
        let r = classification_report(&t, &p);
        assert_eq!(r.per_class.iter().map(|s| s.label).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        // class 0: P 2/3, R 1, F1 0.8; classes 1, 2, 3: F1 0.
        close(r.macro_f1, 0.8 / 4.0);
        close(r.weighted_f1, 0.8 * 2.0 / 4.0);
        close(r.accuracy, 0.5);
        assert_eq!(r.per_class[3].support, 0);
    }

    #[test]
    fn ranks_and_recall() {
        assert_eq!(rank_of_positive(&[0.9, 0.1, 0.95, 0.9]), 1);
        assert_eq!(rank_of_positive(&[0.2, 0.1]), 0);
        let ranks = [0, 3, 7, 12];
        close(recall_at(&ranks, 1), 0.25);
        close(recall_at(&ranks, 5), 0.5);
        close(recall_at(&ranks, 10), 0.75);
    }
}
