"""The online serving edge (HTTP ad requests). The service itself is the subject of a later change."""
