"""The reference library's spellings, as thin aliases over annbatch's own: the one place they live.

Code written for the reference library (its 0.2.x line and release 0.3.1; see
docs/tutorials/coming-from-reference.md) runs unchanged on annbatch. The core classes expose
one spelling per concept; every other spelling the reference's users write is here, a line or
two each, deprecated where the reference deprecated it:

- :class:`LoaderAliases`, inherited by :class:`~annbatch.Loader`: ``add_dataset``,
  ``add_anndata(s)`` (X and obs) and ``add_adata(s)`` (X, obs and var) over its
  ``add_datasets``; and the private attributes clients (scvi-tools) read and set,
  ``_batch_sampler`` and ``_obs``.
- :func:`output_of_to_torch`: the Loader's deprecated ``to_torch`` argument.
- :class:`SamplerAliases`, inherited by :class:`~annbatch.abc.Sampler`: the deprecated
  ``n_iters``; :func:`rows_under_old_key`: the deprecated ``"chunks"`` key of a load request.
- :func:`abc_attribute`: the deprecated ``annbatch.abc.LoadRequest``.

The collection's aliases live with it, in :mod:`annbatch.collection`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from annbatch._compat import import_optional, torch_available
from annbatch._warnings import warn
from annbatch.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import pandas as pd
    from anndata import AnnData

    from annbatch._core.convert import OutputKind
    from annbatch._loader_data import LoaderData
    from annbatch.abc import Sampler


class LoaderAliases:
    """The reference's spellings on the Loader, whose own are :meth:`add_datasets` (arrays,
    with their obs and var) and :attr:`batch_sampler`."""

    if TYPE_CHECKING:
        _data: LoaderData

        @property
        def batch_sampler(self) -> Sampler: ...
        def _set_sampler(self, sampler: Sampler) -> None: ...
        def add_datasets(
            self,
            datasets: Sequence[Any],
            obs: Sequence[pd.DataFrame | None] | None = None,
            var: pd.DataFrame | Sequence[pd.DataFrame | None] | None = None,
        ) -> Self: ...

    def add_dataset(
        self, dataset: Any, obs: pd.DataFrame | None = None, var: pd.DataFrame | None = None
    ) -> Self:
        """Append one array, with its obs and var; see :meth:`add_datasets`."""
        return self.add_datasets([dataset], None if obs is None else [obs], var=var)

    def add_anndatas(self, adatas: Sequence[AnnData]) -> Self:
        """Append AnnData objects whose ``X`` is on disk (``zarr.Array``, ``h5py.Dataset``, CSR
        dataset); each one's ``obs`` is yielded with its rows (its ``var`` is not kept)."""
        from annbatch._loader_data import anndata_parts

        return self.add_datasets(*anndata_parts(adatas, with_var=False))

    def add_anndata(self, adata: AnnData) -> Self:
        """Append one AnnData; see :meth:`add_anndatas`."""
        return self.add_anndatas([adata])

    def add_adatas(self, adatas: Sequence[AnnData]) -> Self:
        """Append AnnData objects, as :meth:`add_anndatas`, taking their ``var`` as the
        Loader's (the spelling of the reference's release 0.3.1)."""
        from annbatch._loader_data import anndata_parts

        return self.add_datasets(*anndata_parts(adatas, with_var=True))

    def add_adata(self, adata: AnnData) -> Self:
        """Append one AnnData with its var; see :meth:`add_adatas`."""
        return self.add_adatas([adata])

    @property
    def _batch_sampler(self) -> Sampler:
        """:attr:`batch_sampler` under the reference's private name, which scvi-tools reads and
        sets: it gives a ``copy.copy`` of the Loader a new sampler with a ``mask`` for its
        training and validation rows. Setting it forgets a resume point loaded for the old one."""
        return self.batch_sampler

    @_batch_sampler.setter
    def _batch_sampler(self, sampler: Sampler) -> None:
        self._set_sampler(sampler)

    @property
    def _obs(self) -> list[pd.DataFrame | None]:
        """One obs per added dataset (None where none was given), as scvi-tools reads it;
        obs that the Loader reads per window from a collection is read whole on each access."""
        return self._data.obs_frames()

    @_obs.setter
    def _obs(self, frames: list[pd.DataFrame | None]) -> None:
        self._data.obs = frames


def output_of_to_torch(to_torch: object) -> OutputKind:
    """What the Loader yields for the deprecated ``to_torch`` (used when ``to`` is not given):
    ``True`` is ``to="torch"``, ``False`` is ``to=None``; None (not given, no warning) is
    torch if it is importable, else no conversion."""
    if to_torch is None:
        return "torch" if torch_available() else "numpy"
    if not isinstance(to_torch, bool):
        msg = f"to_torch must be a bool or None, got {to_torch!r}"
        raise InvalidArgumentError(msg)
    warn(
        "to_torch is deprecated; pass to='torch' or to=None (no conversion) instead",
        DeprecationWarning,
    )
    if to_torch:
        import_optional("torch", purpose="to_torch=True", extra="torch")
    return "torch" if to_torch else "numpy"


class SamplerAliases:
    """The reference's spellings on :class:`~annbatch.abc.Sampler`."""

    if TYPE_CHECKING:

        def n_batches(self, n_obs: int) -> int: ...

    def n_iters(self, n_obs: int) -> int:
        """Deprecated name of :meth:`n_batches`."""
        warn("Sampler.n_iters is deprecated; use n_batches", DeprecationWarning)
        return self.n_batches(n_obs)


def rows_under_old_key(request: Mapping[str, Any], where: str) -> Any:
    """The rows of a load request that names them ``"chunks"``, the deprecated name of
    ``"requests"``; ``where`` names the request in errors."""
    if "requests" in request:
        msg = f"{where} has both 'requests' and 'chunks' (its old name); give only 'requests'"
        raise InvalidArgumentError(msg)
    warn("the 'chunks' key of a load request is deprecated; name it 'requests'", DeprecationWarning)
    return request["chunks"]


def abc_attribute(name: str) -> Any:
    """``annbatch.abc.<name>`` for names that module no longer defines: ``LoadRequest``, the
    deprecated name of the internal :class:`~annbatch.abc._sampler.ChunkRequest`."""
    if name == "LoadRequest":
        warn(
            "annbatch.abc.LoadRequest is deprecated: yield plain dicts "
            "(annbatch.types.LoadRequest: {'requests': [...], 'splits': [...]}) from _sample",
            DeprecationWarning,
        )
        from annbatch.abc._sampler import ChunkRequest

        return ChunkRequest
    msg = f"module 'annbatch.abc' has no attribute {name!r}"
    raise AttributeError(msg)
