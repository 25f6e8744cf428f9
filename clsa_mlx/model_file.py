"""mlx-lm's `model_file` for CLSA / YOCO folders. convert.py copies this file into every folder
it writes (as `clsa_mlx_model.py`, named by config.json's `model_file`), so that
`mlx_lm.generate / chat / server / benchmark --model FOLDER --trust-remote-code` build the model
from the installed clsa-mlx package. `python -m clsa_mlx.model_file FOLDER` adds it to a folder
written before it existed."""

import json
from pathlib import Path

try:
    from clsa_mlx.config import ModelArgs
    from clsa_mlx.model import Model
    from clsa_mlx.server_prefix import install

    try:  # mlx-lm runs this file from the model folder: its config.json names the architecture
        if json.loads(Path(__file__).with_name("config.json").read_text()).get("model_type") == "phi4flash":
            from clsa_mlx.models.phi4flash import Model, ModelArgs  # noqa: F811
    except (OSError, ValueError, AttributeError):
        pass
except ImportError as e:  # run by mlx-lm from a model folder, in an environment without us
    raise ImportError("this CLSA/YOCO model folder needs the clsa-mlx package (pip install clsa-mlx)") from e


if Model.__module__ == "clsa_mlx.model":
    from clsa_mlx.cache_check import check_handed_cache

    class Model(Model):  # noqa: F811
        """Under mlx-lm a prompt-cache file reaches the model directly: each cache list is checked
        against the model before it runs (a longer index cache than K/V reads past the buffers)."""

        def __call__(self, inputs, cache=None, input_embeddings=None):
            if cache is not None:
                check_handed_cache(self, cache)
            return super().__call__(inputs, cache=cache, input_embeddings=input_embeddings)


__all__ = ["Model", "ModelArgs"]

install()  # under mlx-lm's server: keep a chat's document prefix in its prompt cache

if __name__ == "__main__":
    import sys

    from clsa_mlx.loading import add_model_file, one_line

    for folder in sys.argv[1:] or sys.exit("usage: python -m clsa_mlx.model_file FOLDER..."):
        try:
            print(add_model_file(folder))
        except (OSError, ValueError) as e:
            sys.exit(f"error: {one_line(e)}")
