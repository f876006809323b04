//! The self-contained world of the built-in experiment, after section 6.1 of the DPO paper
//! (Rafailov et al. 2023, "controlled sentiment generation"): prompts are prefixes of movie reviews,
//! the ground-truth reward is a sentiment classifier, and each method's reward is plotted against
//! KL(pi || ref). Everything here is made in code or shipped in the repository, so the experiment runs
//! offline: a review generator instead of IMDb, a BPE tokenizer trained on it, VADER instead of a
//! learned sentiment classifier, and PNG charts with an embedded font.

pub mod corpus;
pub mod plot;
pub mod sentiment;
pub mod tokenizer;
