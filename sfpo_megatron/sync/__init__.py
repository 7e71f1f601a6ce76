"""Weight sync transports: moving the export stream's buckets into rollout engines."""
