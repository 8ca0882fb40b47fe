"""Video generation from a bundle alone: a DDIM denoising loop over a TDTM video UNet.

``python samples/video_app.py BUNDLE --steps 20 --out latents.npy``

The bundle's manifest drives everything this app does:

- ``variants``: ``{"merged": {"artifact", "steps": [start, stop]}, "full": {...}}`` —
  TDTM (On-device Sora) merges consecutive frames in the early, coarse denoising steps
  and runs the full model in the late ones; ``session.run(feeds, step=i)`` picks the
  artifact whose ``[start, stop)`` holds step ``i``;
- ``dynamic_loading``: the model is split into blocks loaded one after another to fit a
  phone's memory; ``tome_export.runtime.load`` hands such bundles to
  ``tome_export.runtimes.dynamic.DynamicRunner`` and this loop does not change.

Inputs are found by role: the latent is the input shaped like the first output, the
timestep input has "time" in its name (or one element), any other input (text
embeddings) is zeros unless ``--cond FILE.npy`` is given. Steps index the loop from 0 (the
noisiest) to ``--steps``−1; variants' ``steps`` ranges use the same numbering.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def ddim_timesteps(steps: int, train_steps: int = 1000) -> np.ndarray:
    return np.linspace(train_steps - 1, 0, steps).round().astype(np.int64)


def alphas_cumprod(train_steps: int = 1000) -> np.ndarray:
    # Stable Diffusion's "scaled linear" beta schedule.
    betas = np.linspace(0.00085**0.5, 0.012**0.5, train_steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def roles(manifest: dict) -> tuple[dict, dict, list[dict]]:
    inputs, output = manifest["inputs"], manifest["outputs"][0]
    latent = next((i for i in inputs if i["shape"] == output["shape"]), inputs[0])
    rest = [i for i in inputs if i is not latent]
    timestep = next((i for i in rest if "time" in i["name"].lower()), None)
    if timestep is None:
        timestep = next(
            (i for i in rest if int(np.prod([d if isinstance(d, int) else 1 for d in i["shape"]])) == 1), None
        )
    if timestep is None:
        raise SystemExit("error: the bundle has no timestep input; is it a denoiser?")
    return latent, timestep, [i for i in rest if i is not timestep]


def denoise(session, steps: int, seed: int, cond: np.ndarray | None, log=print) -> np.ndarray:
    latent_spec, time_spec, other_specs = roles(session.manifest)
    shape = [d if isinstance(d, int) else 1 for d in latent_spec["shape"]]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    abar = alphas_cumprod()
    timesteps = ddim_timesteps(steps)
    fixed = {}
    for spec in other_specs:
        dims = [d if isinstance(d, int) else 1 for d in spec["shape"]]
        fixed[spec["name"]] = cond.astype(spec["dtype"]) if cond is not None else np.zeros(dims, dtype=spec["dtype"])
    time_dims = [d if isinstance(d, int) else 1 for d in time_spec["shape"]]
    variants = session.manifest.get("variants") or {}
    for step, t in enumerate(timesteps):
        feeds = {latent_spec["name"]: x, time_spec["name"]: np.full(time_dims, t, dtype=time_spec["dtype"]), **fixed}
        start = time.perf_counter()
        eps = session.run(feeds, step=step) if variants else session.run(feeds)
        eps = next(iter(eps.values())) if isinstance(eps, dict) else eps
        elapsed = (time.perf_counter() - start) * 1e3
        # Deterministic DDIM update (eta = 0).
        a_t = abar[t]
        a_prev = abar[timesteps[step + 1]] if step + 1 < steps else 1.0
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        x = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)
        variant = session.variant_for_step(step) if variants and hasattr(session, "variant_for_step") else "-"
        log(f"step {step:3d}  t={int(t):4d}  variant {variant:<7} {elapsed:8.2f} ms")
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cond", help=".npy conditioning (e.g. text embeddings) for the extra input")
    parser.add_argument("--out", help="write the final latents to this .npy")
    args = parser.parse_args(argv)

    import tome_export.runtime
    from tome_export.errors import BackendMissing, UserError

    try:
        session = tome_export.runtime.load(args.bundle)
        cond = np.load(args.cond) if args.cond else None
        latents = denoise(session, args.steps, args.seed, cond, log=lambda m: print(m, file=sys.stderr))
    except (UserError, BackendMissing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.out:
        np.save(args.out, latents)
    print(f"latents {list(latents.shape)} mean {latents.mean():.4f} std {latents.std():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
