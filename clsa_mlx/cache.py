"""mlx-lm's caches as our models use them: a window cache that speculative decoding can trim past
the window, and a refusal of a `max_kv_size` that mlx-lm would drop without a word."""

from mlx_lm.models import cache


class RotatingKVCache(cache.RotatingKVCache):
    """mlx-lm's window cache, which past the window can also take back the rows of its last
    multi-token step. Such a step (a prompt chunk, or speculative decoding's check of its draft
    tokens) keeps the `window - 1` rows before its S rows, so up to S - 1 of those can go again and
    the window stays whole. After one-token steps the cache holds just the window and, as in
    mlx-lm, nothing can be trimmed: is_trimmable() says so. (Rows kept for that would make it true
    after any generation, and mlx-lm's server prompt cache reads it as trimmable to any length.)
    Its state and its name are mlx-lm's, so a saved cache loads anywhere as mlx-lm's
    RotatingKVCache, which lacks only this trim."""

    def is_trimmable(self):
        return super().is_trimmable() or self._spare() > 0

    def trim(self, n):
        if super().is_trimmable():  # no row dropped yet
            return super().trim(n)
        if n > self._spare():
            raise ValueError(f"a window cache can take back only the {self._spare()} newest rows past its "
                             f"window (those of its last multi-token step), not {n}")
        rows = self.keys.shape[2] - n
        self.keys, self.values = self.keys[..., :rows, :], self.values[..., :rows, :]
        self.offset -= n
        self._idx = rows
        return n

    def _spare(self):
        """Past the window: rows beyond the window's, which a multi-token step leaves in
        temporal order (all of them while none was dropped)."""
        rows = self.keys.shape[2]
        return rows if rows == self.offset else rows - self.max_size


def refuse_max_kv_size(caller):
    """mlx-lm's make_prompt_cache(model, max_kv_size) calls a model's own make_cache() without the
    size; `caller` is the frame that called make_cache()."""
    if caller.f_code is cache.make_prompt_cache.__code__ and caller.f_locals.get("max_kv_size") is not None:
        raise ValueError("CLSA/YOCO models take no max_kv_size (--max-kv-size): their window is the model's own "
                         "and every cross layer reads the one K/V of all tokens; leave it unset")
