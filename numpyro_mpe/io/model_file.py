"""A user's model file and data table, read for ``numpyro-mpe run`` and ``numpyro-mpe report``.

A model file is a Python file that defines a NumPyro model and ``data(df) -> (args, kwargs)`` (another name
with ``--data-fn``), which builds the model's arguments from the data table (a CSV read with pandas).
:func:`user_inputs` reads both for a command's arguments; every mistake is a
:class:`~numpyro_mpe.io.cli_arguments.CLIError` that names the file, the function or the flag.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from numpyro_mpe.io.cli_arguments import DATA_FN, CLIError

#: Modules imported from model files are named this prefix + the file's stem.
USER_MODULE_PREFIX = "numpyro_mpe_user_"


def _defined_names(module) -> list[str]:
    """Public callables defined in ``module`` itself (not imported), else all its public names."""
    own = [n for n, v in vars(module).items()
           if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__]
    return sorted(own) or sorted(n for n in vars(module) if not n.startswith("_"))


def _split_spec(spec: str) -> tuple[str, str]:
    """``path/to/file.py:name`` -> (path, name); ``name`` defaults to ``model``."""
    path_text, sep, attr = spec.rpartition(":")
    if not sep or not path_text or not attr.isidentifier():  # no ':name' (or a Windows drive letter)
        return spec, "model"
    return path_text, attr


def import_model_file(path: Path):
    """Import the Python file ``path`` as a fresh module (its folder importable while it runs)."""
    import importlib.util
    import re
    import traceback

    name = USER_MODULE_PREFIX + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"'{path}' cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
        if line is None:
            frames = [f for f in traceback.extract_tb(exc.__traceback__)
                      if Path(f.filename).resolve() == path.resolve()]
            line = frames[-1].lineno if frames else None
        where = f" (line {line})" if line else ""
        raise CLIError(f"importing '{path}' failed{where}: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def load_user_model(spec: str, data_fn: str = DATA_FN):
    """The model and data function of a model file, from ``path/to/model.py:name``.

    Parameters
    ----------
    spec : str
        ``FILE.py:NAME``: the file and the model's name in it (``model`` when ``:NAME`` is omitted).
    data_fn : str, default "data"
        Name of the function ``data(df) -> (args, kwargs)`` in the same file.

    Returns
    -------
    tuple
        ``(model, data_function, path, name)``.

    Raises
    ------
    CLIError
        The file does not exist or fails to import, ``NAME`` or ``data_fn`` is not defined there (the
        message lists what is), or either is not callable.

    Examples
    --------
    >>> from numpyro_mpe.io.cli import load_user_model
    >>> model, data, path, name = load_user_model("examples/user_model.py:model")  # doctest: +SKIP
    """
    path_text, attr = _split_spec(spec)
    path = Path(path_text)
    if not path.exists():
        raise CLIError(f"model file '{path_text}' not found")
    if not path.is_file():
        raise CLIError(f"model file '{path_text}' is not a file")
    module = import_model_file(path)
    names = _defined_names(module)
    if not hasattr(module, attr):
        raise CLIError(f"'{path_text}' has no attribute '{attr}' (the model); it defines: "
                       f"{', '.join(names) or 'nothing'}. Name the model as {path_text}:NAME")
    model = getattr(module, attr)
    if not callable(model):
        raise CLIError(f"'{path_text}:{attr}' is a {type(model).__name__}, not a model function")
    fn = getattr(module, data_fn, None)
    if fn is None:
        raise CLIError(
            f"'{path_text}' has no function '{data_fn}' to build the model's arguments from the data table; "
            f"define `def {data_fn}(df): return args, kwargs` there (args a tuple, kwargs a dict, e.g. "
            f"((X,), {{'y': y}})), or name yours with --data-fn. It defines: {', '.join(names) or 'nothing'}")
    if not callable(fn):
        raise CLIError(f"'{path_text}:{data_fn}' is a {type(fn).__name__}, not a function")
    return model, fn, path, attr


def _read_csv(path_text: str):
    import pandas as pd

    path = Path(path_text)
    if not path.exists():
        raise CLIError(f"data file '{path_text}' not found")
    if not path.is_file():
        raise CLIError(f"data file '{path_text}' is not a file")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read '{path_text}' as CSV: {exc}") from exc


def _model_inputs(fn, df, where: str) -> tuple[tuple, dict]:
    from collections.abc import Mapping

    name = getattr(fn, "__name__", DATA_FN)
    try:
        out = fn(df)
    except Exception as exc:
        raise CLIError(f"{name}(df) in '{where}' raised {type(exc).__name__}: {exc} "
                       f"(the table's columns: {list(df.columns)})") from exc
    if (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], (tuple, list))
            and isinstance(out[1], Mapping)):
        return tuple(out[0]), dict(out[1])
    raise CLIError(f"{name}(df) in '{where}' must return (args, kwargs), a tuple of the model's positional "
                   f"arguments and a dict of its keyword arguments, e.g. ((X,), {{'y': y}}); got "
                   f"{type(out).__name__}")


@dataclass
class ModelInputs:
    """What a command analyses: the model, its arguments, the table they came from, and how to name them.

    Examples
    --------
    >>> from numpyro_mpe.io.datasets import load_stackloss, stackloss_inputs, stackloss_model
    >>> from numpyro_mpe.io.model_file import ModelInputs
    >>> df = load_stackloss()
    >>> inputs = ModelInputs(stackloss_model, *stackloss_inputs(df), table=df, where="stackloss_model",
    ...                      data="stack loss (bundled, N = 21)")
    >>> inputs.args[0].shape
    (21, 3)
    """

    model: Callable
    args: tuple
    kwargs: dict
    table: Any  # pandas.DataFrame
    where: str  # the model: "path/to/model.py:model", or the demo's module path
    data: str  # the data, as the report's header shows it
    id_column: str | None = None  # --id-column: the column of ``table`` that names the observations

    def labels_for(self, site) -> Any:
        """One label per observation of ``site``, from the column ``id_column`` of the table.

        Parameters
        ----------
        site : ObservedSite
            The observed site analysed (its ``num_obs`` must be the table's number of rows).

        Returns
        -------
        pandas.Series or None
            The labels as text, named after the column; ``None`` without an ``id_column``.

        Raises
        ------
        CLIError
            The column and the site have different lengths (e.g. the data function drops rows).

        Examples
        --------
        >>> inputs.labels_for(adapter.observed["y"]).iloc[8]  # doctest: +SKIP
        'District of Columbia'
        """
        if self.id_column is None:
            return None
        values = self.table[self.id_column].astype(str).reset_index(drop=True)
        if len(values) != site.num_obs:
            raise CLIError(f"--id-column '{self.id_column}' has {len(values)} rows, the observed site "
                           f"'{site.name}' has {site.num_obs} observations")
        return values


def user_inputs(args: argparse.Namespace) -> ModelInputs:
    """The model, its arguments and the table named by a command's arguments (``FILE.py:NAME``, ``--data``,
    ``--data-fn``, ``--id-column``).

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments of ``numpyro-mpe run`` or ``numpyro-mpe report``, with ``args.data`` given.

    Returns
    -------
    ModelInputs

    Raises
    ------
    CLIError
        As :func:`load_user_model`; the table cannot be read, ``data(df)`` fails or returns something else
        than ``(args, kwargs)``, or ``--id-column`` is not a column of the table.

    Examples
    --------
    >>> from numpyro_mpe.io.cli import build_parser
    >>> from numpyro_mpe.io.model_file import user_inputs
    >>> args = build_parser().parse_args(["run", "examples/user_model.py:model",
    ...                                   "--data", "examples/user_data.csv", "--id-column", "state"])
    >>> inputs = user_inputs(args)  # doctest: +SKIP
    >>> inputs.where, inputs.data  # doctest: +SKIP
    ('examples/user_model.py:model', 'examples/user_data.csv (51 rows)')
    """
    model, fn, path, name = load_user_model(args.model, args.data_fn)
    df = _read_csv(args.data)
    model_args, model_kwargs = _model_inputs(fn, df, str(path))
    if args.id_column is not None and args.id_column not in df.columns:
        raise CLIError(f"--id-column '{args.id_column}' is not a column of the data; columns: "
                       f"{list(df.columns)}")
    return ModelInputs(model, model_args, model_kwargs, table=df, where=f"{path}:{name}",
                       data=f"{args.data} ({len(df)} rows)", id_column=args.id_column)


__all__ = ["USER_MODULE_PREFIX", "ModelInputs", "import_model_file", "load_user_model", "user_inputs"]
