"""Stage C consumers of the codec (text-to-image, previews)."""
