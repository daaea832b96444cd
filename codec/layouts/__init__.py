"""Checkpoint layouts of Stable Cascade and the conversions between them.

* :mod:`.official`: the official flat files, component names, :class:`~.official.Located`;
* :mod:`.diffusers`: 🤗 diffusers' model folders, key and config mapping to and from ours;
* :mod:`.comfyui`: ComfyUI's all-in-one single files;
* :mod:`.locate`: finding a component in a source in any layout and opening it under official keys;
* :mod:`.inventory`: what a source holds, from headers only;
* :mod:`.convert`: ``cascade convert``, writing a source in another layout.
"""
