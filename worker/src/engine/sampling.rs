//! Turning logits into the next token: greedy, temperature, top-k, top-p, seeded; and the
//! log-probabilities a client asked for.
//!
//! Sampling is resumable: the random draw for the `i`-th generated token depends only on the
//! seed and `i` (ChaCha8 keyed by the seed, stream `i`), never on how many draws came before in
//! this process. So a request that is resubmitted with the tokens it already has produces
//! exactly the tokens it would have produced without the interruption.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::logits::log_sum_exp;
use crate::backend::{top_k, BestLogits, RowLogits, Wants};
use crate::error::{Error, Result};

/// How a request samples. Temperature 0 is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Makes sampling reproducible (and resumable); without it the sampler picks a random seed.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks the values a client sent, naming the field that is wrong.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidRequest(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidRequest(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// The token chosen at one step, with its log-probability and the best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// log-softmax of the raw logits at `token` (before temperature and filtering).
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens of the same distribution, best first.
    pub top: Vec<(u32, f32)>,
}

/// A request's sampler: its parameters and its seed.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self { params, seed }
    }

    /// What this sampler needs of a row's logits to report `top_logprobs` alternatives: the
    /// best one (greedy) or the best `top_k` (top-k sampling), and as many as it reports;
    /// every logit otherwise.
    pub fn wants(&self, top_logprobs: usize) -> Wants {
        let k = if self.params.temperature == 0.0 {
            1
        } else if self.params.top_k > 0 {
            self.params.top_k
        } else {
            return Wants::All;
        };
        Wants::Best(k.max(top_logprobs))
    }

    /// Picks generated token number `index` (0 for the first) from a row's logits and reports
    /// `top_logprobs` alternatives; `None` where the row has no logits. The best logits of
    /// [`Self::wants`] give what all of them would, up to the rounding of the log-sum-exp.
    pub fn sample(&self, logits: &RowLogits, top_logprobs: usize, index: usize) -> Option<Sampled> {
        match logits {
            RowLogits::Nothing => None,
            RowLogits::All(logits) => Some(self.sample_all(logits, top_logprobs, index)),
            RowLogits::Best(best) => Some(self.sample_best(best, top_logprobs, index)),
        }
    }

    fn sample_all(&self, logits: &[f32], top_logprobs: usize, index: usize) -> Sampled {
        let logprobs = log_softmax(logits);
        let token = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            let candidates = top_k(logits, self.candidates(logits.len()));
            let values: Vec<f32> = candidates.iter().map(|&i| logits[i]).collect();
            candidates[self.draw(&values, index)]
        };
        let top = if top_logprobs == 0 {
            Vec::new()
        } else {
            top_k(&logprobs, top_logprobs)
                .into_iter()
                .map(|i| (i as u32, logprobs[i]))
                .collect()
        };
        Sampled {
            token: token as u32,
            logprob: logprobs[token],
            top,
        }
    }

    fn sample_best(&self, best: &BestLogits, top_logprobs: usize, index: usize) -> Sampled {
        let at = if self.params.temperature == 0.0 {
            0
        } else {
            let k = self.candidates(best.values.len());
            self.draw(&best.values[..k], index)
        };
        let top = (best.ids.iter().zip(&best.values))
            .take(top_logprobs)
            .map(|(&id, &v)| (id, v - best.log_sum))
            .collect();
        Sampled {
            token: best.ids[at],
            logprob: best.values[at] - best.log_sum,
            top,
        }
    }

    /// How many of `len` tokens, best first, a draw chooses among (top-k).
    fn candidates(&self, len: usize) -> usize {
        if self.params.top_k == 0 {
            len
        } else {
            self.params.top_k.min(len)
        }
    }

    /// Draws one of `logits`, the candidates' in order best first, for generated token number
    /// `index`; returns its position.
    fn draw(&self, logits: &[f32], index: usize) -> usize {
        let t = self.params.temperature;
        let max = logits[0];
        let mut probs: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        // Nucleus: the smallest prefix whose mass reaches top_p (always at least one token).
        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let mass: f32 = probs[..keep].iter().sum();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index as u64);
        let mut u = rng.random::<f32>() * mass;
        for (i, p) in probs[..keep].iter().enumerate() {
            if u < *p {
                return i;
            }
            u -= p;
        }
        keep - 1
    }
}

/// `log_softmax` in f32, as transformers computes it for the reported logprobs.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let log_sum = log_sum_exp(logits);
    logits.iter().map(|l| l - log_sum).collect()
}

fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_reports_log_softmax() {
        let s = Sampler::new(SamplingParams::default());
        let out = s.sample_all(&[1.0, 3.0, 2.0], 2, 0);
        assert_eq!(out.token, 1);
        let z = (1f32.exp() + 3f32.exp() + 2f32.exp()).ln();
        assert!((out.logprob - (3.0 - z)).abs() < 1e-6);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_seed_makes_sampling_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let run = || {
            let s = Sampler::new(params.clone());
            (0..20)
                .map(|i| s.sample_all(&logits, 0, i).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        assert!(
            run().iter().any(|&t| t != run()[0]),
            "temperature 1 should not always pick one token"
        );
    }

    #[test]
    fn a_draw_depends_only_on_the_seed_and_the_index() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: Some(11),
            ..Default::default()
        };
        let first = Sampler::new(params.clone());
        let all: Vec<u32> = (0..30)
            .map(|i| first.sample_all(&logits, 0, i).token)
            .collect();
        // A fresh sampler that starts at token 17, as a resubmitted request does.
        let resumed = Sampler::new(params);
        let tail: Vec<u32> = (17..30)
            .map(|i| resumed.sample_all(&logits, 0, i).token)
            .collect();
        assert_eq!(tail, all[17..]);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.1, 0.5, 2.0, -1.0];
        for params in [
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
                seed: Some(1),
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 1e-6,
                seed: Some(1),
                ..Default::default()
            },
        ] {
            let s = Sampler::new(params);
            assert!((0..20).all(|i| s.sample_all(&logits, 0, i).token == 2));
        }
    }

    /// Greedy and top-k samplers want only the best logits, and sample from them what they
    /// sample from all: the same tokens, logprobs and alternatives. Others want all.
    #[test]
    fn the_best_logits_sample_what_all_of_them_do() {
        let logits: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let sampler = |temperature, top_k, top_p| {
            Sampler::new(SamplingParams {
                temperature,
                top_k,
                top_p,
                seed: Some(5),
            })
        };
        for (s, top_logprobs, k) in [
            (sampler(0.0, 0, 1.0), 0, 1),
            (sampler(0.0, 0, 1.0), 3, 3),
            (sampler(0.7, 5, 1.0), 2, 5),
            (sampler(1.3, 8, 0.6), 12, 12),
        ] {
            assert_eq!(s.wants(top_logprobs), Wants::Best(k));
            let all = RowLogits::All(logits.clone());
            let best = RowLogits::Best(BestLogits::of(&logits, k));
            for index in 0..30 {
                let want = s.sample(&all, top_logprobs, index);
                assert_eq!(
                    s.sample(&best, top_logprobs, index),
                    want,
                    "{s:?}, token {index}"
                );
            }
        }
        assert_eq!(sampler(0.7, 0, 0.9).wants(4), Wants::All);
        assert_eq!(sampler(0.7, 0, 0.9).sample(&RowLogits::Nothing, 0, 0), None);
    }

    #[test]
    fn bad_parameters_name_the_field() {
        let bad_t = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        };
        assert!(bad_t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        let bad_t = SamplingParams {
            temperature: -0.5,
            ..Default::default()
        };
        assert!(bad_t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        for p in [0.0, 1.5, f32::NAN] {
            let bad = SamplingParams {
                top_p: p,
                ..Default::default()
            };
            assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
        }
    }
}
