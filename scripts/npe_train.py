"""Train the amortised GRF posterior model and save it (``python scripts/npe_train.py OUT [key=value ...]``).

Keys of :class:`PosteriorConfig` and :class:`PosteriorTrainConfig` may be overridden, e.g.
``hidden_size=64 batch_size=64 max_seconds=600``.
"""

import dataclasses
import json
import sys

from pixeldit.posterior_model import PosteriorConfig
from pixeldit.posterior_training import PosteriorTrainConfig, train_posterior


def main(argv: list[str]) -> None:
    out, overrides = argv[0], dict(a.split("=", 1) for a in argv[1:])
    model_keys = {f.name: f.type for f in dataclasses.fields(PosteriorConfig)}
    train_keys = {f.name: f.type for f in dataclasses.fields(PosteriorTrainConfig)}
    mk, tk = {}, {}
    for k, v in overrides.items():
        if k not in model_keys and k not in train_keys:
            raise SystemExit(f"error: unknown key {k!r}")
        (mk if k in model_keys else tk)[k] = json.loads(v)
    config = PosteriorConfig.preset("grf", **mk)
    tc = PosteriorTrainConfig(**tk)
    print(config, tc, flush=True)
    _, history = train_posterior(config, tc, workdir=out, log=lambda s: print(s, flush=True))
    print(f"trained {history['steps_done']} steps in {history['train_seconds']} s wall, {history['train_cpu_seconds']} s CPU", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
