//! One PPO minibatch on the model: forward with activations kept, the clipped losses, and their gradient
//! back through the LM head, the value head and the shared trunk:
//!
//! ```text
//! loss = policy_loss(logp) + vf_coef * value_loss(V)
//! dhidden  = head_backward(d loss / d logp)                   LM head -> [N, d], head weights' gradient
//! dhidden += (d loss / d V) w   (rows that predict tokens)    value head -> [N, d], w and b gradient
//! backward(dhidden)                                           trunk
//! ```

use engine::model::Model;
use engine::{Activations, Decoder, EngineError, Params, ScalarHead};

use super::loss::{policy_loss, value_loss};
use super::rollout::Rollout;
use super::PpoConfig;
use crate::data::pack_sequences;

/// The losses of one minibatch and what TRL logs beside them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MinibatchLoss {
    /// `policy_loss + vf_coef * value_loss`
    pub loss: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub clip_frac: f64,
    pub value_clip_frac: f64,
    pub approx_kl: f64,
    /// Completion tokens in the minibatch.
    pub tokens: usize,
}

/// Gradient buffers: the policy's parameters, the value head's, and the `[N, d]` hidden-state gradient.
pub struct Grads<'a> {
    pub policy: &'a mut Params,
    pub head: &'a mut ScalarHead,
    pub dhidden: &'a mut Vec<f32>,
}

/// The loss of sequences `rows` of the rollout under `params` and `head`; with `grads`, its gradient is
/// accumulated (`+=`) into them.
#[allow(clippy::too_many_arguments)]
pub fn minibatch_loss(
    decoder: &Decoder,
    params: &Params,
    head: &ScalarHead,
    rollout: &Rollout,
    rows: &[usize],
    cfg: &PpoConfig,
    acts: &mut Activations,
    grads: Option<Grads<'_>>,
) -> Result<MinibatchLoss, EngineError> {
    let pairs: Vec<(&[u32], &[u32])> = rows.iter().map(|&i| rollout.pair(i)).collect();
    let (batch, ranges) = pack_sequences(&pairs);
    let model = Model::new(params, None).with_precision(cfg.precision);
    let out = decoder.logprobs(model, &batch, acts, grads.is_some())?;
    // Per-token arrays of the minibatch, in target order (the sequences' targets are contiguous and in
    // row order, so concatenating the rollout's per-sequence vectors lines them up).
    let logp: Vec<f64> = out.logp.iter().map(|&v| v as f64).collect();
    let gather = |per_seq: &[Vec<f64>]| -> Vec<f64> { rows.iter().flat_map(|&i| per_seq[i].iter().copied()).collect() };
    let old_logp: Vec<f64> = rows.iter().flat_map(|&i| rollout.logp[i].iter().map(|&v| v as f64)).collect();
    let (adv, old_values, returns) = (gather(&rollout.advantages), gather(&rollout.values), gather(&rollout.returns));
    debug_assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), logp.len());
    debug_assert_eq!(old_logp.len(), logp.len());
    let positions = || batch.targets.iter().map(|t| t.pos as usize);
    let values = head.forward(&acts.hidden, positions());

    let pg = policy_loss(&logp, &old_logp, &adv, cfg.clip_range);
    let vf = value_loss(&values, &old_values, &returns, cfg.clip_range_value);
    let loss = pg.loss + cfg.vf_coef * vf.loss;
    if let Some(g) = grads {
        let dlogp: Vec<f32> = pg.grad.iter().map(|&v| v as f32).collect();
        let dvalues: Vec<f64> = vf.grad.iter().map(|&v| cfg.vf_coef * v).collect();
        g.dhidden.clear();
        g.dhidden.resize(batch.len() * decoder.cfg.hidden, 0.0);
        decoder.head_backward(model, &batch, acts, &dlogp, &mut *g.policy, g.dhidden)?;
        head.backward(&acts.hidden, positions(), &dvalues, g.head, g.dhidden);
        decoder.backward(model, &batch, acts, g.dhidden, g.policy)?;
    }
    Ok(MinibatchLoss {
        loss,
        policy_loss: pg.loss,
        value_loss: vf.loss,
        clip_frac: pg.clip_frac,
        value_clip_frac: vf.clip_frac,
        approx_kl: pg.approx_kl,
        tokens: logp.len(),
    })
}
