//! The mining index's specification: what both searches must return, checked on small sets.

#![allow(clippy::unwrap_used)]

use tch::Device;

use super::synthetic::{ClusteredSpec, clustered};
use super::*;

fn labels(pairs: &[(u32, u32)]) -> Vec<RowLabel> {
    pairs
        .iter()
        .map(|&(instance, category)| RowLabel { instance, category })
        .collect()
}

/// A matrix of `rows.len()` rows with the given (instance, category) labels.
fn matrix(rows: &[Vec<f32>], pairs: &[(u32, u32)]) -> EmbeddingMatrix {
    let dim = rows[0].len();
    EmbeddingMatrix::new(dim, rows.concat(), labels(pairs)).unwrap()
}

/// Each query's neighbour rows: what two searches must agree on (their similarities may differ
/// in the last bit, since a matrix product sums in another order than `dot`).
fn rows_of(neighbours: &Neighbours) -> Vec<(usize, Vec<usize>)> {
    neighbours
        .results()
        .iter()
        .map(|r| (r.query, r.neighbours.iter().map(|n| n.row).collect()))
        .collect()
}

fn both(matrix: &EmbeddingMatrix, scope: Scope, k: usize) -> [Neighbours; 2] {
    let approx = search_hnsw(matrix, scope, k, &HnswParams::default()).unwrap();
    let exact = search_exact(matrix, scope, k, Queries::All, Device::Cpu).unwrap();
    [approx, exact]
}

/// What every result must satisfy: no neighbour of the query's instance (nor, per category, of
/// another category), at most k, no repeats, similarity descending with ties by row, ranks 1..,
/// and similarities that are the rows' dot products.
fn check_invariants(matrix: &EmbeddingMatrix, scope: Scope, neighbours: &Neighbours) {
    for result in neighbours.results() {
        let query = matrix.label(result.query);
        let list = &result.neighbours;
        assert!(list.len() <= neighbours.k(), "query {}", result.query);
        for (at, n) in list.iter().enumerate() {
            let label = matrix.label(n.row);
            assert_ne!(
                label.instance, query.instance,
                "query {} got its own instance",
                result.query
            );
            if scope == Scope::PerCategory {
                assert_eq!(
                    label.category, query.category,
                    "query {} crossed categories",
                    result.query
                );
            }
            assert_eq!(n.rank as usize, at + 1);
            let expected = dot(matrix.row(result.query), matrix.row(n.row));
            assert!(
                (n.similarity - expected).abs() < 1e-5,
                "query {} row {}",
                result.query,
                n.row
            );
        }
        for pair in list.windows(2) {
            let ordered = pair[0].similarity > pair[1].similarity
                || (pair[0].similarity == pair[1].similarity && pair[0].row < pair[1].row);
            assert!(
                ordered,
                "query {}: {:?} before {:?}",
                result.query, pair[0], pair[1]
            );
        }
    }
}

#[test]
fn hnsw_recall_at_10_is_at_least_095_on_a_clustered_set() {
    // Small because the crate's own code is unoptimised in test builds; the benchmark measures
    // recall at 10k and 100k rows.
    let matrix = clustered(&ClusteredSpec::new(4, 25, 4, 16, 7)).unwrap();
    for scope in [Scope::Global, Scope::PerCategory] {
        let [approx, exact] = both(&matrix, scope, 10);
        check_invariants(&matrix, scope, &approx);
        check_invariants(&matrix, scope, &exact);
        let recall = recall_at_k(&approx, &exact, 10);
        assert_eq!(recall.queries, matrix.len());
        assert_eq!(recall.expected, matrix.len() * 10);
        assert!(recall.recall >= 0.95, "{scope:?}: {recall:?}");
    }
}

#[test]
fn two_deterministic_builds_give_identical_neighbours() {
    let matrix = clustered(&ClusteredSpec::new(5, 30, 4, 32, 11)).unwrap();
    // A small ef makes the graph's exact shape matter, so a difference in build order would show.
    let params = HnswParams {
        ef_construction: 16,
        ef_search: 16,
        seed: 3,
        ..HnswParams::default()
    };
    let first = search_hnsw(&matrix, Scope::Global, 10, &params).unwrap();
    let second = search_hnsw(&matrix, Scope::Global, 10, &params).unwrap();
    assert_eq!(first, second);
    assert_eq!(first.total(), matrix.len() * 10);
}

#[test]
fn a_large_instance_neither_appears_among_its_own_neighbours_nor_crowds_them_out() {
    // Instance 0 has 40 near-identical rows, closer to each other than to anything else; with
    // ef_search 8 the graph alone would return only instance 0, so the index must look past it.
    let mut rows = Vec::new();
    let mut pairs = Vec::new();
    for i in 0..40 {
        rows.push(vec![1.0, 0.001 * i as f32, 0.0, 0.0]);
        pairs.push((0, 0));
    }
    for i in 0..20 {
        rows.push(vec![1.0, 0.5 + 0.01 * i as f32, 0.3, 0.0]);
        pairs.push((1 + i / 2, 0));
    }
    let matrix = matrix(&rows, &pairs);
    let params = HnswParams {
        ef_search: 8,
        ..HnswParams::default()
    };
    let approx = search_hnsw(&matrix, Scope::Global, 5, &params).unwrap();
    let exact = search_exact(&matrix, Scope::Global, 5, Queries::All, Device::Cpu).unwrap();
    check_invariants(&matrix, Scope::Global, &approx);
    check_invariants(&matrix, Scope::Global, &exact);
    assert_eq!(approx.short_lists(), 0);
    assert_eq!(exact.short_lists(), 0);
    assert_eq!(recall_at_k(&approx, &exact, 5).recall, 1.0);
}

#[test]
fn per_category_scope_never_crosses_categories_and_global_does() {
    // Two categories whose rows are closer across categories than within: the scope, not the
    // geometry, must keep them apart.
    let rows: Vec<Vec<f32>> = (0..24)
        .map(|i| {
            let angle = 0.05 * i as f32;
            vec![angle.cos(), angle.sin(), 0.1 * (i % 3) as f32]
        })
        .collect();
    let pairs: Vec<(u32, u32)> = (0..24).map(|i| (i / 2, i % 2)).collect();
    let matrix = matrix(&rows, &pairs);
    let [approx, exact] = both(&matrix, Scope::PerCategory, 4);
    check_invariants(&matrix, Scope::PerCategory, &approx);
    check_invariants(&matrix, Scope::PerCategory, &exact);
    assert_eq!(rows_of(&approx), rows_of(&exact));

    let global = search_exact(&matrix, Scope::Global, 4, Queries::All, Device::Cpu).unwrap();
    let crosses = global.results().iter().any(|r| {
        r.neighbours
            .iter()
            .any(|n| matrix.label(n.row).category != matrix.label(r.query).category)
    });
    assert!(
        crosses,
        "the global scope should reach the other category here"
    );
}

#[test]
fn k_larger_than_the_population_returns_every_other_instance_row() {
    // One category, three instances of two rows: each query has four rows of other instances.
    let rows: Vec<Vec<f32>> = (0..6).map(|i| vec![1.0, i as f32, 1.0]).collect();
    let pairs = [(0, 0), (0, 0), (1, 0), (1, 0), (2, 0), (2, 0)];
    let matrix = matrix(&rows, &pairs);
    for scope in [Scope::Global, Scope::PerCategory] {
        for neighbours in both(&matrix, scope, 10) {
            check_invariants(&matrix, scope, &neighbours);
            assert_eq!(neighbours.results().len(), 6);
            assert!(neighbours.results().iter().all(|r| r.neighbours.len() == 4));
            assert_eq!(neighbours.short_lists(), 6);
        }
    }
}

#[test]
fn a_single_instance_has_no_neighbours() {
    let rows: Vec<Vec<f32>> = (0..5).map(|i| vec![1.0, i as f32]).collect();
    let matrix = matrix(&rows, &[(7, 0); 5]);
    for scope in [Scope::Global, Scope::PerCategory] {
        for neighbours in both(&matrix, scope, 3) {
            assert_eq!(neighbours.results().len(), 5);
            assert_eq!(neighbours.total(), 0);
        }
    }
}

#[test]
fn a_category_with_one_instance_gets_no_neighbours_while_the_others_do() {
    let rows: Vec<Vec<f32>> = (0..8).map(|i| vec![1.0, i as f32, 2.0]).collect();
    // Category 0: instances 0 and 1; category 1: instance 2 only.
    let pairs = [
        (0, 0),
        (0, 0),
        (1, 0),
        (1, 0),
        (2, 1),
        (2, 1),
        (2, 1),
        (2, 1),
    ];
    let matrix = matrix(&rows, &pairs);
    for neighbours in both(&matrix, Scope::PerCategory, 3) {
        check_invariants(&matrix, Scope::PerCategory, &neighbours);
        for row in 0..4 {
            assert_eq!(neighbours.get(row).unwrap().len(), 2, "row {row}");
        }
        for row in 4..8 {
            assert!(neighbours.get(row).unwrap().is_empty(), "row {row}");
        }
    }
}

#[test]
fn an_empty_matrix_gives_empty_results() {
    let matrix = EmbeddingMatrix::new(4, Vec::new(), Vec::new()).unwrap();
    for neighbours in both(&matrix, Scope::Global, 3) {
        assert!(neighbours.results().is_empty());
    }
}

/// Two rows' similarity in f64.
fn similarity64(matrix: &EmbeddingMatrix, a: usize, b: usize) -> f64 {
    matrix
        .row(a)
        .iter()
        .zip(matrix.row(b))
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// Top-k by a straightforward f64 loop over all pairs.
fn brute_force(matrix: &EmbeddingMatrix, scope: Scope, k: usize) -> Vec<Vec<(usize, f64)>> {
    (0..matrix.len())
        .map(|query| {
            let q = matrix.label(query);
            let mut candidates: Vec<(usize, f64)> = (0..matrix.len())
                .filter(|&row| {
                    let label = matrix.label(row);
                    label.instance != q.instance
                        && (scope == Scope::Global || label.category == q.category)
                })
                .map(|row| (row, similarity64(matrix, query, row)))
                .collect();
            candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            candidates.truncate(k);
            candidates
        })
        .collect()
}

#[test]
fn exact_search_agrees_with_a_brute_force_f64_loop() {
    let spec = ClusteredSpec {
        image_spread: 0.8,
        ..ClusteredSpec::new(3, 6, 4, 20, 5)
    };
    let matrix = clustered(&spec).unwrap();
    for scope in [Scope::Global, Scope::PerCategory] {
        for k in [1, 7, 100] {
            let exact = search_exact(&matrix, scope, k, Queries::All, Device::Cpu).unwrap();
            check_invariants(&matrix, scope, &exact);
            for (result, truth) in exact.results().iter().zip(brute_force(&matrix, scope, k)) {
                let what = format!("{scope:?} k={k} query {}", result.query);
                assert_eq!(result.neighbours.len(), truth.len(), "{what}");
                // Position by position, the row found is as similar as the true one: rows whose
                // similarities differ in the last bits may trade places (f32 matmul and top-k
                // against an f64 loop), a wrong neighbour may not.
                for (n, t) in result.neighbours.iter().zip(&truth) {
                    let found = similarity64(&matrix, result.query, n.row);
                    assert!(
                        (found - t.1).abs() < 1e-5,
                        "{what}: row {} for {}",
                        n.row,
                        t.0
                    );
                    assert!((f64::from(n.similarity) - found).abs() < 1e-5, "{what}");
                }
            }
        }
    }
}

#[test]
fn ties_are_broken_by_row_in_both_searches() {
    // Rows 1..=5 are identical and of five other instances: a query from row 0 ties on all of
    // them, and top-3 must be rows 1, 2, 3 whatever order topk or the graph found them in.
    let mut rows = vec![vec![1.0, 0.0, 0.0]];
    rows.extend(std::iter::repeat_n(vec![1.0, 1.0, 0.0], 5));
    rows.push(vec![0.0, 0.0, 1.0]);
    let pairs: Vec<(u32, u32)> = (0..7).map(|i| (i, 0)).collect();
    let matrix = matrix(&rows, &pairs);
    for neighbours in both(&matrix, Scope::Global, 3) {
        let top: Vec<usize> = neighbours.get(0).unwrap().iter().map(|n| n.row).collect();
        assert_eq!(top, vec![1, 2, 3]);
    }
}

#[test]
fn exact_search_answers_only_the_rows_asked_for_and_refuses_a_row_out_of_range() {
    let matrix = clustered(&ClusteredSpec::new(2, 4, 2, 8, 1)).unwrap();
    let rows = [5, 1, 5];
    let some = search_exact(&matrix, Scope::Global, 2, Queries::Rows(&rows), Device::Cpu).unwrap();
    let queried: Vec<usize> = some.results().iter().map(|r| r.query).collect();
    assert_eq!(queried, vec![1, 5]);
    let all = search_exact(&matrix, Scope::Global, 2, Queries::All, Device::Cpu).unwrap();
    // Another matmul shape: the same rows unless the second and third neighbours of row 5 tie,
    // which this data does not (checked, so the comparison cannot pass or fail by rounding).
    let truth = &brute_force(&matrix, Scope::Global, 3)[5];
    assert!(truth[1].1 - truth[2].1 > 1e-4, "{truth:?}");
    let rows = |n: Option<&[Neighbour]>| n.unwrap().iter().map(|n| n.row).collect::<Vec<_>>();
    assert_eq!(rows(some.get(5)), rows(all.get(5)));

    let err =
        search_exact(&matrix, Scope::Global, 2, Queries::Rows(&[16]), Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("query row 16 is out of range"),
        "{err}"
    );
}

#[test]
fn a_zero_or_non_finite_row_is_refused_and_others_are_normalised() {
    let err =
        EmbeddingMatrix::new(2, vec![3.0, 4.0, 0.0, 0.0], labels(&[(0, 0), (1, 0)])).unwrap_err();
    assert!(matches!(err, MlError::ZeroEmbedding { row: 1 }), "{err}");
    assert!(err.to_string().contains("row 1 is a zero vector"), "{err}");

    let err = EmbeddingMatrix::new(2, vec![f32::NAN, 1.0], labels(&[(0, 0)])).unwrap_err();
    assert!(
        matches!(err, MlError::NonFiniteEmbedding { row: 0 }),
        "{err}"
    );

    let err = EmbeddingMatrix::new(2, vec![1.0, 2.0, 3.0], labels(&[(0, 0), (1, 0)])).unwrap_err();
    assert!(
        err.to_string().contains("3 values for 2 labelled rows"),
        "{err}"
    );

    let ok = EmbeddingMatrix::new(2, vec![3.0, 4.0], labels(&[(0, 0)])).unwrap();
    assert_eq!(ok.row(0), &[0.6, 0.8]);
}

#[test]
fn a_tensor_becomes_a_normalised_matrix() {
    let tensor = tch::Tensor::from_slice(&[3.0f64, 4.0, 0.0, 2.0]).view([2, 2]);
    let matrix = EmbeddingMatrix::from_tensor(&tensor, labels(&[(0, 0), (1, 0)])).unwrap();
    assert_eq!(matrix.row(0), &[0.6, 0.8]);
    assert_eq!(matrix.row(1), &[0.0, 1.0]);
    let err = EmbeddingMatrix::from_tensor(&tensor, labels(&[(0, 0)])).unwrap_err();
    assert!(err.to_string().contains("2 rows but 1 labels"), "{err}");
}

#[test]
fn recall_counts_the_exact_rows_the_approximate_search_found() {
    let list = |query: usize, rows: &[usize]| QueryNeighbours {
        query,
        neighbours: rows
            .iter()
            .zip(1u32..)
            .map(|(&row, rank)| Neighbour {
                row,
                similarity: 1.0 - rank as f32 / 10.0,
                rank,
            })
            .collect(),
    };
    let exact = Neighbours::new(2, vec![list(0, &[1, 2]), list(1, &[0, 2]), list(2, &[])]);
    let approx = Neighbours::new(2, vec![list(0, &[2, 3]), list(1, &[2, 0]), list(2, &[0])]);
    let recall = recall_at_k(&approx, &exact, 2);
    assert_eq!((recall.queries, recall.found, recall.expected), (2, 3, 4));
    assert_eq!(recall.recall, 0.75);
}

#[test]
fn a_query_sample_is_seeded_distinct_and_sorted() {
    let a = sample_queries(1000, 50, 9);
    assert_eq!(a, sample_queries(1000, 50, 9));
    assert_ne!(a, sample_queries(1000, 50, 10));
    assert_eq!(a.len(), 50);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(sample_queries(5, 50, 9), vec![0, 1, 2, 3, 4]);
}
