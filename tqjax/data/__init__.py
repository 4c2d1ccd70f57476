"""Text data shipped with tqjax (the NIAH haystack)."""
