"""Planning: block profiles in, a Deployment (stages, replicas, micro-batches, recomputation) out."""
