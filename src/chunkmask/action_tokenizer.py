"""`ActionTokenizer`: OpenVLA's 256-bin action-token codec, on torch tensors.

OpenVLA (Kim et al., 2024, https://arxiv.org/abs/2406.09246) and the RL trainers built on it
(SimpleVLA-RL, RLinf, openvla-oft's discrete head) turn each normalised action dimension in
`[low, high]` into one of the last `num_bins` tokens of a Llama-2 vocabulary of `vocab_size`
tokens. The model's padded vocabulary appends 64 pad tokens after them, so the action logits
sit at `logits[..., vocab_size - num_bins : vocab_size]` (`logits[..., -256-64:-64]` for
OpenVLA's 32000 + 64).
"""

import torch
from jaxtyping import Float, Int64, Integer
from torch import Tensor

from chunkmask._checks import (
    check_finite,
    check_generator,
    check_positive_int,
    check_real,
    check_tensor,
    values_checkable,
)

__all__ = ["ActionTokenizer"]


class ActionTokenizer:
    r"""Encode actions as OpenVLA's action tokens, decode them, and score sampled tokens.

    With edges $b_j = \text{low} + j\,\frac{\text{high} - \text{low}}{n - 1}$, $j = 0..n-1$
    (`numpy.linspace(low, high, n)`, $n$ = `num_bins`) and the $n - 1$ centres
    $c_j = (b_j + b_{j+1}) / 2$:

    $$
    \text{encode}(a) = V - \operatorname{digitize}(\operatorname{clip}(a, \text{low},
    \text{high}), b), \qquad
    \text{decode}(t) = c_{\operatorname{clip}(V - t - 1,\, 0,\, n - 2)},
    $$

    where $V$ = `vocab_size` and `digitize` is `numpy.digitize` (right-open bins: the $d$ with
    $b_{d-1} \le x < b_d$, and $d = n$ at $x = \text{high}$). This is exactly the mapping of
    OpenVLA's `prismatic/vla/action_tokenizer.py` (Kim et al., 2024,
    https://arxiv.org/abs/2406.09246), used unchanged by openvla-oft, SimpleVLA-RL and RLinf.

    Note:
        - The token ids run from $V - n$ (the action `high`) to $V - 1$ (the action `low`): a
          larger action has a smaller id.
        - $n$ edges make only $n - 1$ centres, so the two top ids $V - n$ and $V - n + 1$ both
          decode to the last centre, and `decode(encode(a))` is the centre of the bin holding
          `a` (for `a = high`, the last bin). Decoding clips, as OpenVLA does: any id decodes.
        - The columns of `bin_logits` are in token-id order: column $j$ is the id
          $V - n + j$ (`token_begin + j`), which is also the order of
          `logits[..., -256-64:-64]` in the RL trainers.
        - Edges and centres are float64, built with numpy's `linspace` arithmetic, so that
          bin boundaries agree with OpenVLA's numpy code bit for bit.

    Args:
        num_bins: $n$, the number of edges (and action tokens); OpenVLA uses 256.
        vocab_size: $V$, the size of the base vocabulary whose last $n$ ids are the action
            tokens (32000 for Llama 2); pad tokens, if any, come after it.
        low: the smallest action (normalised actions live in `[-1, 1]`).
        high: the largest action, `> low`.

    Raises:
        TypeError: if `num_bins` or `vocab_size` is not an int, or `low`/`high` not a real number.
        ValueError: if `num_bins < 2`, `vocab_size < num_bins`, or `low >= high` or either is not
            finite.

    Example:
        >>> import torch
        >>> tok = ActionTokenizer()
        >>> ids = tok.encode(torch.tensor([-1.0, 0.0, 0.999, 1.0, 5.0]))
        >>> ids.tolist()
        [31999, 31872, 31745, 31744, 31744]
        >>> tok.decode(ids[:2], dtype=torch.float64).tolist()
        [-0.996078431372549, 0.0]
        >>> logits = torch.zeros(2, 32064)  # padded vocabulary
        >>> tok.bin_logits(logits).shape, tok.log_prob(logits, ids[:2]).exp().tolist()
        (torch.Size([2, 256]), [0.00390625, 0.00390625])
    """

    def __init__(
        self,
        num_bins: int = 256,
        vocab_size: int = 32000,
        low: float = -1.0,
        high: float = 1.0,
    ) -> None:
        self.num_bins = check_positive_int(num_bins, "num_bins")
        if self.num_bins < 2:
            raise ValueError(
                f"`num_bins` must be >= 2 (edges of at least one bin), got {num_bins}."
            )
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        if self.vocab_size < self.num_bins:
            raise ValueError(
                f"`vocab_size` must be >= `num_bins` ({self.num_bins}), got {vocab_size}."
            )
        self.low = check_real(low, "low")
        self.high = check_real(high, "high")
        if not self.low < self.high:
            raise ValueError(f"`high` must be > `low` ({self.low}), got {self.high}.")
        # numpy.linspace(low, high, n): y_j = j * step + low in float64, then y_{n-1} = high.
        step = (self.high - self.low) / (self.num_bins - 1)
        edges = torch.arange(self.num_bins, dtype=torch.float64) * step + self.low
        edges[-1] = self.high
        self._edges = edges
        self._centres = (edges[:-1] + edges[1:]) / 2
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"ActionTokenizer(num_bins={self.num_bins}, vocab_size={self.vocab_size}, "
            f"low={self.low}, high={self.high})"
        )

    @property
    def token_begin(self) -> int:
        """The smallest action-token id, `vocab_size - num_bins` (the column-0 id of `bin_logits`)."""
        return self.vocab_size - self.num_bins

    @property
    def bin_edges(self) -> Float[Tensor, " edge"]:
        """The `num_bins` float64 edges, `numpy.linspace(low, high, num_bins)`."""
        return self._edges.clone()

    @property
    def bin_centres(self) -> Float[Tensor, " centre"]:
        """The `num_bins - 1` float64 bin centres that `decode` returns."""
        return self._centres.clone()

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._cache:
            self._cache[device] = (self._edges.to(device), self._centres.to(device))
        return self._cache[device]

    def encode(
        self, actions: Float[Tensor, "*batch"], *, validate_args: bool = False
    ) -> Int64[Tensor, "*batch"]:
        """Map each action coordinate to its token id (OpenVLA's `__call__`, as ids).

        Args:
            actions: any-shape float tensor of normalised actions; values outside
                `[low, high]` are clipped first, as in OpenVLA.
            validate_args: check that `actions` is finite (off by default: one host sync).

        Returns:
            int64 token ids in `[vocab_size - num_bins, vocab_size - 1]`, shape of `actions`.

        Raises:
            TypeError: if `actions` is not a floating-point tensor.
            ValueError: if `actions` holds NaN or Inf (numpy would silently give the top id).
        """
        check_tensor(actions, "actions", dtypes="float")
        if values_checkable(actions, validate_args):
            check_finite(actions, "actions")
        edges, _ = self._tables(actions.device)
        # float32/bf16 -> float64 is exact, so the comparisons are numpy's float64 ones.
        x = actions.to(torch.float64).clamp(self.low, self.high)
        # numpy.digitize(x, b) (right=False) is the d with b[d-1] <= x < b[d]: bucketize(right=True).
        digit = torch.bucketize(x, edges, right=True)
        return self.vocab_size - digit

    def decode(
        self, ids: Integer[Tensor, "*batch"], *, dtype: torch.dtype = torch.float32
    ) -> Float[Tensor, "*batch"]:
        """Map token ids back to actions: the bin centres (OpenVLA's `decode_token_ids_to_actions`).

        Args:
            ids: any-shape integer tensor of token ids. Ids outside the action range are
                clipped to the nearest end, exactly as OpenVLA does.
            dtype: the floating dtype of the result (the centres are float64 internally).

        Returns:
            Actions of shape `ids.shape` in `dtype`.

        Raises:
            TypeError: if `ids` is not an integer tensor or `dtype` not a floating dtype.
        """
        check_tensor(ids, "ids", dtypes="int")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating torch.dtype, got {dtype!r}.")
        _, centres = self._tables(ids.device)
        index = (self.vocab_size - 1 - ids.to(torch.int64)).clamp(0, self.num_bins - 2)
        return centres[index].to(dtype)

    def bin_logits(self, logits: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch bin"]:
        """The action-token logits of a (possibly padded) vocabulary, in token-id order.

        Args:
            logits: `(..., V')` logits over a vocabulary of `V' >= vocab_size` entries (pad
                tokens after `vocab_size` are dropped).

        Returns:
            A `(..., num_bins)` view, `logits[..., vocab_size - num_bins : vocab_size]`; column
            `j` is token id `token_begin + j`. The dtype is kept (bfloat16 stays bfloat16).

        Raises:
            TypeError: if `logits` is not a floating-point tensor.
            ValueError: if `logits` is 0-d or its last size is smaller than `vocab_size`.
        """
        check_tensor(logits, "logits", dtypes="float")
        if logits.ndim == 0 or logits.shape[-1] < self.vocab_size:
            raise ValueError(
                f"`logits` must have a last size >= `vocab_size` ({self.vocab_size}), got shape "
                f"{tuple(logits.shape)}."
            )
        return logits[..., self.token_begin : self.vocab_size]

    def _ids_to_columns(self, ids: Tensor, name: str, validate_args: bool) -> Tensor:
        check_tensor(ids, name, dtypes="int")
        columns = ids.to(torch.int64) - self.token_begin
        if values_checkable(ids, validate_args):
            bad = (columns < 0) | (columns >= self.num_bins)
            if bool(bad.any()):
                raise ValueError(
                    f"`{name}` must hold action-token ids in [{self.token_begin}, "
                    f"{self.vocab_size - 1}], got {ids[bad].flatten()[:5].tolist()}."
                )
        return columns

    def _scaled_log_softmax(self, logits: Tensor, temperature: float) -> Tensor:
        temperature = check_real(temperature, "temperature")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        x = self.bin_logits(logits)
        x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        return torch.log_softmax(x / temperature, dim=-1)

    def log_prob(
        self,
        logits: Float[Tensor, "*batch vocab"],
        ids: Integer[Tensor, "*batch"],
        *,
        temperature: float = 1.0,
        validate_args: bool = False,
    ) -> Float[Tensor, "*batch"]:
        r"""Log-probabilities of sampled action tokens under the action-only softmax.

        $$
        \log \pi(t \mid o) = \frac{z_t}{\tau} - \log \sum_{j=0}^{n-1} \exp \frac{z_{V-n+j}}{\tau},
        $$

        the softmax restricted to the `num_bins` action tokens (every other token masked to
        $-\infty$), at temperature $\tau$, as the RL samplers of SimpleVLA-RL and RLinf compute
        both the behaviour and the current log-probabilities.

        Args:
            logits: `(..., V')` logits over the padded vocabulary (or any `V' >= vocab_size`).
            ids: `(...)` sampled token ids, the leading shape of `logits`.
            temperature: $\tau > 0$, the sampling temperature (the paper uses 1.6).
            validate_args: check that every id is an action token (off by default: one host sync).

        Returns:
            `(...)` log-probabilities in float32 (float64 for float64 logits); bfloat16 and
            float16 logits are upcast before the softmax.

        Raises:
            TypeError: if `logits` is not floating point or `ids` not an integer tensor.
            ValueError: on a shape mismatch, a `temperature` that is not positive, or an id that
                is not an action token.
        """
        logp = self._scaled_log_softmax(logits, temperature)
        check_tensor(ids, "ids", dtypes="int")
        if tuple(ids.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"`ids` must have the leading shape of `logits` {tuple(logits.shape[:-1])}, got "
                f"{tuple(ids.shape)}."
            )
        columns = self._ids_to_columns(ids, "ids", validate_args)
        if columns.device != logp.device:
            raise ValueError(
                f"`ids` must be on the device of `logits` ({logp.device}), got {columns.device}."
            )
        columns = columns.clamp(0, self.num_bins - 1)
        return logp.gather(-1, columns.unsqueeze(-1)).squeeze(-1)

    def entropy(
        self, logits: Float[Tensor, "*batch vocab"], *, temperature: float = 1.0
    ) -> Float[Tensor, "*batch"]:
        r"""Entropy of the action-only softmax at temperature $\tau$, per token position.

        $$
        H = -\sum_{j} \pi_j \log \pi_j, \qquad \pi = \operatorname{softmax}(z_{V-n:V} / \tau).
        $$

        Args:
            logits: `(..., V')` logits over the padded vocabulary.
            temperature: $\tau > 0$.

        Returns:
            `(...)` entropies in float32 (float64 for float64 logits), in `[0, log num_bins]`.

        Raises:
            TypeError: if `logits` is not floating point.
            ValueError: on a bad `logits` shape or a `temperature` that is not positive.
        """
        logp = self._scaled_log_softmax(logits, temperature)
        return -(logp.exp() * logp).sum(-1)

    def sample(
        self,
        logits: Float[Tensor, "*batch vocab"],
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Int64[Tensor, "*batch"]:
        r"""Draw action-token ids from the action-only softmax at temperature $\tau$.

        Uses the Gumbel-max trick, $\arg\max_j (z_j/\tau + g_j)$ with $g_j \sim$ Gumbel(0, 1),
        which samples exactly from $\operatorname{softmax}(z/\tau)$ over the action tokens and
        never returns a text or pad token.

        Args:
            logits: `(..., V')` logits over the padded vocabulary.
            temperature: $\tau > 0$.
            generator: the `torch.Generator` to draw with (on the device of `logits`), or None
                for torch's global RNG.

        Returns:
            `(...)` int64 token ids in `[token_begin, vocab_size - 1]`.

        Raises:
            TypeError: if `logits` is not floating point or `generator` not a torch.Generator.
            ValueError: on a bad `logits` shape or a `temperature` that is not positive.
        """
        check_generator(generator)
        logp = self._scaled_log_softmax(logits, temperature)
        u = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=logp.dtype)
        tiny = torch.finfo(logp.dtype).tiny
        gumbel = -torch.log(-torch.log(u.clamp_min(tiny)))  # u in [tiny, 1): finite
        return (logp + gumbel).argmax(-1) + self.token_begin
