//! A training step through an adapter on a frozen base allocates nothing of the base's size: no gradient
//! buffer, no weight-gradient scratch. Measured with a counting allocator (its own test binary, one test,
//! so that no other test's allocations are counted).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use dpo_engine::presets::init_random;
use dpo_engine::rng::Rng;
use dpo_engine::{Activations, Adapter, Batch, Decoder, DecoderConfig, Dims, Grads, LoraTarget, Model, Site};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), SeqCst) + layout.size();
        PEAK.fetch_max(live, SeqCst);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn an_adapter_step_allocates_nothing_of_the_base_size() {
    // A wide vocabulary and hidden size against a short batch: the base is large, the activations small.
    let cfg = DecoderConfig::llama(Dims {
        vocab_size: 4000,
        hidden: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        ffn_hidden: 128,
        max_positions: 64,
    });
    let (m, p) = (Decoder::new(cfg.clone()), init_random(&cfg, 0.05, 1));
    let base_bytes: usize = p.named().iter().map(|(_, t)| 4 * t.data.len()).sum();
    let all_linear: Vec<LoraTarget> = Site::ALL
        .iter()
        .map(|&site| {
            let rows = 0..site.dims(&cfg).1;
            LoraTarget { module: format!("{site:?}"), site, rows, r: 8, scale: 2.0 }
        })
        .collect();
    let mut a = Adapter::zeros(&cfg, &vec![all_linear; cfg.n_layers], 0.0);
    a.init_peft(&mut Rng::new(2));
    let mut b = Batch::default();
    b.push_sequence(&[5, 900, 17, 3999, 42, 8, 64, 1000], 1);
    b.push_sequence(&[7, 2, 3000, 11], 1);
    let dlogp = vec![0.1f32; b.targets.len()];
    let mut grads = a.zeros_like();

    let model = Model::new(&p, Some(&a));
    let mut step = || {
        let mut acts = Activations::default();
        m.logprobs(model, &b, &mut acts, true).unwrap();
        m.backward_logprobs(model, &b, &mut acts, &dlogp, Grads::Adapter(&mut grads)).unwrap();
    };
    // The first step fills the kernels' per-thread caches (GEMM packing, about 1 MB; the head's logits
    // chunk), kept for the life of each thread whatever the step; the second shows what a step itself
    // allocates, its activations included. Both run on a pool of one thread, so that the second cannot
    // land on a thread whose caches the first did not fill.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let step_peak = pool.install(|| {
        step();
        let start = LIVE.load(SeqCst);
        PEAK.store(start, SeqCst);
        step();
        PEAK.load(SeqCst) - start
    });

    assert!(grads.layers[1].pairs[0].b.data.iter().any(|&v| v != 0.0), "the step produced no gradient");
    assert!(
        step_peak * 8 < base_bytes,
        "a frozen-base step allocated up to {step_peak} bytes, more than 1/8 of the base's {base_bytes}"
    );
}
