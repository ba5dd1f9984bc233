"""Experimental methods: new post-training methods land here first, one self-contained module each.

Contract:
- No stability promise: names, defaults, metrics and behaviour may change (or a method may move to the stable
  core, or be removed) in any release. Pin the jaxpt version if you depend on one.
- Each module holds the whole method: its config dataclass (TRL's names and defaults where TRL has the method),
  its pure loss (docstring with the formula and the paper), data preparation, `make_train_step` (jitted, explicit
  shardings, state donated) and `train()`, plus a `jaxpt <method>` command.
- Each is tested against TRL's own loss code where TRL has the method (otherwise against the paper's formula
  computed independently in float64), and trains a tiny model that improves its own objective.
- Dependency rules: an experimental module may use the stable helpers (`jaxpt.data`, `jaxpt.loop`,
  `jaxpt.sharding`, `jaxpt.train_state`, `jaxpt.losses.logprobs`, ...), never another experimental module; it
  imports a stable method module only when it extends that method (`bema` is DPO with another reference and uses
  `jaxpt.dpo`'s data and step; `gmpo` is GRPO with another loss and uses `jaxpt.grpo`'s config and rollout;
  `gkd`, `gold` and `iw_opd` extend `jaxpt.distillation`, `async_grpo` `jaxpt.grpo`). Stable code never
  imports `jaxpt.experimental` (`jaxpt.cli` reaches the commands lazily, as it does every method).
- Importing this package imports no method: `from jaxpt.experimental import orpo`.

Methods:
- `orpo`: ORPO (arXiv:2403.07691), TRL's `trl.experimental.orpo`.
- `cpo`: CPO (arXiv:2401.08417) with SimPO (arXiv:2405.14734) and AlphaPO (arXiv:2501.03884), TRL's
  `trl.experimental.cpo`.
- `tpo`: TPO (arXiv:2405.16681) on (prompt, chosen, rejected, gold reference) triples, TRL's `trl.experimental.tpo`.
- `bema`: DPO with a BEMA reference (arXiv:2508.00180), TRL's `trl.experimental.bema_for_ref_model`.
- `gmpo`: GMPO (arXiv:2507.20673), GRPO with the geometric mean of the token ratios, TRL's `trl.experimental.gmpo`.
- `a2po`: A*-PO (arXiv:2505.20686), optimal advantage regression, TRL's `trl.experimental.a2po`.
- `bco`: BCO (arXiv:2404.04656) on unpaired feedback (TRL 1.16 no longer has it: tested against the paper).
- `ppo`: PPO with a value model, per-token KL penalty and GAE (arXiv:1707.06347, arXiv:2203.02155), TRL's old
  `PPOTrainer` (not in TRL 1.16: tested against the formulas in float64).
- `prm`: process reward models (arXiv:2211.14275), step-wise supervision, TRL's old `PRMTrainer` (not in TRL 1.16).
- `online_dpo`: Online DPO (arXiv:2402.04792), two samples per prompt ranked by reward functions, TRL's
  `trl.experimental.online_dpo`.
- `xpo`: XPO (arXiv:2405.21046), Online DPO against reference samples plus an exploration bonus (TRL 1.16 no longer
  has it: tested against the paper).
- `nash_md`: Nash-MD (arXiv:2312.00886), policy gradient on the preference over geometric-mixture samples (TRL 1.16
  no longer has it: tested against the paper).
- `sdpo`: SDPO, RL via self-distillation from successful rollouts (arXiv:2601.20802), TRL's `trl.experimental.sdpo`.
- `sdft`: SDFT, on-policy self-distillation from a demonstration-conditioned teacher (arXiv:2601.19897), TRL's
  `trl.experimental.sdft`.
- `gkd`: GKD (arXiv:2306.13649), TRL's `trl.experimental.gkd`: extends `jaxpt.distillation` (its data, sampling
  and step) with GKD's deltas.
- `gold`: GOLD, TRL's `trl.experimental.gold`: extends `jaxpt.distillation` to a teacher with another tokenizer
  (ULD, arXiv:2402.12030, on byte-aligned token groups).
- `iw_opd`: Importance-Weighted On-Policy Distillation (arXiv:2606.22600), TRL's `trl.experimental.iw_opd`;
  extends `jaxpt.distillation`.
- `async_grpo`: GRPO with the next rollout overlapping the update (bounded staleness, importance correction),
  TRL's `trl.experimental.async_grpo`; extends `jaxpt.grpo`.
"""
