"""The tiny world at run time: its procedural scenes, the deterministic checker that reads them, the subject's
prompt sets, and the DreamBooth showroom (``python -m hra_diffusion.tiny rates``). Its committed assets' paths:
:mod:`hra_diffusion.paths`; rebuilding them: ``python -m tools.tiny_world`` (not part of the library)."""
