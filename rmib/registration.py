"""Makes every custom Keras object of rmib known to Keras as soon as Keras needs one.

A `.keras` file names its custom objects "rmib>Name" (`CBAM`,
`ImageNetPreprocessing`, `Dual2Net`, the losses ...), and Keras finds them in
its global registry, filled when the module defining each one is imported.
`import rmib` must stay light (`rmib --help` imports no TensorFlow), so
nothing is imported up front: `install` puts a registry in Keras' place whose
first look-up of an "rmib>" name it does not hold imports `rmib.tasks` (which
imports every method, and so every module that registers an object). It is
installed when `import rmib` runs, if Keras is already imported, or else
right after Keras itself is imported (a finder on `sys.meta_path` that steps
aside once used). So `import rmib, keras; keras.models.load_model(path)`
opens any `.keras` file rmib wrote.
"""

from __future__ import annotations

import sys

PACKAGE_PREFIX = "rmib>"


def register_custom_objects() -> None:
    """Import every rmib module that registers Keras objects (all of them, through `rmib.tasks`)."""
    from rmib import tasks  # noqa: F401  (imported for its registrations; TensorFlow-heavy)


class _LazyRegistry(dict):
    """Keras' registry of custom objects, registering rmib's on the first "rmib>" miss."""

    def __contains__(self, name):
        found = dict.__contains__(self, name)
        if not found and isinstance(name, str) and name.startswith(PACKAGE_PREFIX):
            register_custom_objects()
            found = dict.__contains__(self, name)
        return found


def install() -> None:
    """Put the lazy registry in place of Keras' (Keras must be imported)."""
    from keras.src.saving import object_registration

    if not isinstance(object_registration.GLOBAL_CUSTOM_OBJECTS, _LazyRegistry):
        object_registration.GLOBAL_CUSTOM_OBJECTS = _LazyRegistry(
            object_registration.GLOBAL_CUSTOM_OBJECTS
        )


class _AfterKerasImport:
    """A `sys.meta_path` finder that runs `install` right after the `keras` package is imported.

    It finds nothing itself: it asks the finders after it for Keras' spec and
    wraps its loader's `exec_module` (no `importlib.abc` base: it is not needed,
    and importing it would slow `import rmib` down).
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            install()

        spec.loader.exec_module = exec_then_install
        return spec


def install_when_keras_is_imported() -> None:
    """`install` now if Keras is imported, else right after it is."""
    if "keras" in sys.modules:
        install()
    elif not any(isinstance(finder, _AfterKerasImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterKerasImport())
