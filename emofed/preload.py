"""Import the shared heavy packages once, under one module lock, before the apps need them.

Flower's simulation runtime loads the ServerApp (in a thread) and the ClientApp (in the
main thread) of one process at the same time. Two threads importing torch, or one of our
packages, concurrently can meet circular imports from both ends: a thread whose first
contact with a package is ``from pkg.sub import ...`` holds ``pkg.sub``'s import lock
while it waits for ``pkg``, whose ``__init__`` in the other thread needs ``pkg.sub``;
CPython breaks that deadlock with a partially initialised module ("partially initialized
module 'torch.utils'", or a ``KeyError``). ``server`` and ``client`` import this module
first: the thread that gets here second waits on this one module's lock, holding none of
the others, until everything below is fully imported.
"""

# isort: off
import torch  # noqa: F401
import torch.utils.data  # noqa: F401
import opacus  # noqa: F401
import models  # noqa: F401
import privacy  # noqa: F401
# isort: on
