"""Per-architecture attention classes for mechanisms that add weights or caches."""
