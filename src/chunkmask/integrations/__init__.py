"""Drop-ins for the trainers users already run: RLinf, verl and SimpleVLA-RL.

Each submodule is imported explicitly (`import chunkmask.integrations.verl`) and never by
`import chunkmask`; the RLinf and verl ones import their trainer and fail with an `ImportError`
naming the package when it is missing. See `docs/integrations.md` for the wiring of each trainer.

- `chunkmask.integrations.rlinf`: `register()` for `RLINF_EXT_MODULE`, the `chunkmask_pcm`
  policy loss, `shrink_rollout_batch` and the `PCMActorMixin` for `EmbodiedFSDPActor`.
- `chunkmask.integrations.verl`: the `chunkmask_pcm` policy loss (a `verl.plugins` entry point)
  and the driver-side `apply_selection`.
- `chunkmask.integrations.simplevla`: `select_chunks`, the fixed-shape per-trajectory gather.
"""
