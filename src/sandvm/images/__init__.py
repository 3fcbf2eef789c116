"""Images: OCI sources (layout, archive, registry), layer flattening, ext4 rootfs, cache."""
