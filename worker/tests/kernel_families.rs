//! Every kernel family this CPU can run (`moebius_worker::backend::kernels`), forced in turn,
//! against the transformers goldens of the fixtures whose products run on the packed bf16
//! kernels. Its own test binary: forcing a family is process-wide.

mod golden;

use golden::check_against_transformers;
use moebius_worker::backend::kernels::{self, Family};

/// The fixtures whose weights are bf16, so that the packed kernels run their products.
const BF16_FIXTURES: [&str; 3] = ["demo", "tiny-v3", "tiny-v3-fp8"];

#[test]
fn every_kernel_family_this_cpu_has_matches_transformers() {
    let families = Family::supported_here();
    let names: Vec<&str> = families.iter().map(|f| f.name()).collect();
    eprintln!("kernel families of this CPU: {names:?}");
    assert!(families.contains(&Family::Portable));
    for family in families {
        kernels::force(family).expect("a family this CPU supports");
        for name in BF16_FIXTURES {
            let worst = check_against_transformers(name);
            eprintln!(
                "{} kernels, {name}: worst logprob difference {worst:.2e}",
                family.name()
            );
        }
    }
    kernels::force(Family::best()).expect("the best family");
}
