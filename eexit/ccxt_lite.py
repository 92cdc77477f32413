"""ccxt without the ~110 exchanges eexit never builds.

`import ccxt` runs ccxt/__init__.py, which imports every exchange class: about 78 MB of RSS and
0.7 s of start-up in each daemon, for the one venue it talks to (the risk kernel: 86 MB against
its 60 MB target; the EEW: 119 MB against 120 MB). Importing this module first puts a stand-in
package in sys.modules["ccxt"]: the real package's spec and __path__ (so `ccxt.base.errors`,
`ccxt.okx`, ... import from ccxt's own files, unchanged), and a module __getattr__ (PEP 562) that
fills an attribute on first use:
- an error class or precision constant (ccxt.ExchangeError, ccxt.TICK_SIZE) from ccxt.base;
- an exchange class (getattr(ccxt, "okx")) from its own submodule ccxt/okx.py: the attribute is
  the class, as in ccxt (importing a submodule binds the package attribute to the module first);
- anything else (ccxt.exchanges, ccxt.Exchange, __version__, ...) runs ccxt's own __init__.py in
  the stand-in, which from then on IS the full package: a name that exists in ccxt resolves.
If ccxt is imported already (a tool or a test imported it first), that module is used unchanged.
Where it lives: in the core, imported by eexit/exchange.py and eexit/venues/base.py (so any
import order gets it), not on the risk kernel's path only: every daemon that builds an exchange
gains (the EEW's RSS and start-up most), for about 20 code lines.
Measured (docs/BENCHMARKS.md §9): a process that builds one exchange peaks at ~46 MB instead of
~80 MB and starts in about half the time; the risk kernel runs at 54-56 MB (target 60).
Checked with ccxt 4.5.90 (requirements.lock).
"""

import importlib
import importlib.util
import os
import sys


def _stand_in():
    spec = importlib.util.find_spec("ccxt")
    package = importlib.util.module_from_spec(spec)      # __path__, __file__, __spec__ of the real one

    def attribute(name):
        public = name.isidentifier() and not name.startswith("_")     # dunders: the full package
        for home in ("ccxt.base.errors", "ccxt.base.decimal_to_precision"):
            found = importlib.import_module(home).__dict__.get(name) if public else None
            if found is not None:
                setattr(package, name, found)
                return found
        if public and os.path.isfile(os.path.join(package.__path__[0], name + ".py")):
            setattr(package, name, getattr(importlib.import_module("ccxt." + name), name))
            return package.__dict__[name]
        package.__dict__.pop("__getattr__", None)   # the full package from here on (a second
        # thread arriving here finds it gone already: pop, not del, so it never raises)
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = attribute
    return package


ccxt = sys.modules.get("ccxt") or sys.modules.setdefault("ccxt", _stand_in())
