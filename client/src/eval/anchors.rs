//! The PyTorch numbers to beat (../shared/anchors/heads-pytorch.md), embedded so the report can
//! put them beside ours without the shared folder. Top-1 %, mean and std over seeds.

/// One row of the anchor table: (mean, std) per column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Anchor {
    pub k: usize,
    pub ncm: (f64, f64),
    pub flat: (f64, f64),
    pub hier_child: (f64, f64),
    pub hier_parent_branch: (f64, f64),
    pub flat_parent_via_child: (f64, f64),
}

impl Anchor {
    /// The best child top-1 of the three PyTorch heads: the column Taxon's default must beat.
    pub fn best_child(&self) -> (&'static str, (f64, f64)) {
        [
            ("NCM", self.ncm),
            ("flat", self.flat),
            ("hier", self.hier_child),
        ]
        .into_iter()
        .fold(
            ("NCM", self.ncm),
            |best, c| if c.1.0 > best.1.0 { c } else { best },
        )
    }
}

const fn row(k: usize, v: [(f64, f64); 5]) -> Anchor {
    Anchor {
        k,
        ncm: v[0],
        flat: v[1],
        hier_child: v[2],
        hier_parent_branch: v[3],
        flat_parent_via_child: v[4],
    }
}

/// pets: 2 parents, 37 children, 10 photos per child; 10 seeds.
const PETS: &[Anchor] = &[
    row(
        1,
        [
            (62.3, 2.1),
            (60.3, 2.7),
            (59.8, 2.6),
            (96.3, 0.9),
            (97.2, 1.0),
        ],
    ),
    row(
        3,
        [
            (81.2, 1.6),
            (80.5, 1.5),
            (81.4, 1.6),
            (98.2, 0.7),
            (99.1, 0.5),
        ],
    ),
    row(
        5,
        [
            (86.2, 1.2),
            (84.6, 2.2),
            (85.6, 1.5),
            (98.3, 0.5),
            (99.1, 0.4),
        ],
    ),
    row(
        8,
        [
            (87.2, 2.5),
            (88.0, 1.8),
            (87.6, 2.5),
            (98.5, 1.1),
            (99.3, 0.9),
        ],
    ),
];

/// birds: 21 parents, 100 children, 45-60 photos per child; 5 seeds.
const BIRDS: &[Anchor] = &[
    row(
        1,
        [
            (39.8, 1.0),
            (39.8, 0.9),
            (38.2, 0.9),
            (61.9, 0.8),
            (59.3, 1.0),
        ],
    ),
    row(
        3,
        [
            (60.7, 0.8),
            (63.2, 0.9),
            (60.9, 0.9),
            (74.1, 0.8),
            (78.7, 0.8),
        ],
    ),
    row(
        5,
        [
            (69.2, 0.6),
            (71.7, 0.6),
            (68.8, 0.7),
            (78.3, 0.7),
            (84.4, 0.2),
        ],
    ),
    row(
        8,
        [
            (74.5, 0.5),
            (77.4, 0.6),
            (74.5, 0.4),
            (81.7, 0.3),
            (87.8, 0.3),
        ],
    ),
];

/// The anchors for a dataset folder name, with how many seeds they averaged.
pub fn for_dataset(name: &str) -> Option<(&'static [Anchor], u32)> {
    match name {
        "pets" => Some((PETS, 10)),
        "birds" => Some((BIRDS, 5)),
        _ => None,
    }
}

pub fn at(name: &str, k: usize) -> Option<Anchor> {
    for_dataset(name).and_then(|(rows, _)| rows.iter().find(|a| a.k == k).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_column_per_k() {
        assert_eq!(at("pets", 5).unwrap().best_child(), ("NCM", (86.2, 1.2)));
        assert_eq!(at("pets", 8).unwrap().best_child(), ("flat", (88.0, 1.8)));
        assert_eq!(at("birds", 3).unwrap().best_child(), ("flat", (63.2, 0.9)));
        assert!(at("pets", 2).is_none());
        assert!(for_dataset("cars").is_none());
    }
}
