"""Built-in training strategies, one module per plugin, grouped by the hooks they use.

``BUILTIN_PLUGINS`` maps the name users type in ``--plugins`` to ``module:class``; modules
are imported only when their plugin is used or listed.
"""

BUILTIN_PLUGINS: dict[str, str] = {
    "stratified": "plugins.samplers.stratified:Stratified",
    "curriculum": "plugins.samplers.curriculum:Curriculum",
    "balanced_grad": "plugins.gradients.balanced_grad:BalancedGrad",
    "pcgrad": "plugins.gradients.pcgrad:PCGrad",
    "terrain_loss": "plugins.losses.terrain_loss:TerrainLoss",
    "domain_bn": "plugins.norms.domain_bn:DomainBN",
    "terrain_embedding": "plugins.conditioning.terrain_embedding:TerrainEmbedding",
    "terrain_head": "plugins.auxiliary.terrain_head:TerrainHead",
    "ema": "plugins.averaging.ema:Ema",
    "teacher_forcing": "plugins.generators.teacher_forcing:TeacherForcing",
    "straight_through": "plugins.generators.straight_through:StraightThrough",
    "reinforce": "plugins.generators.reinforce:Reinforce",
    "refiner": "plugins.generators.refiner:Refiner",
    "encoder_only": "plugins.generators.encoder_only:EncoderOnly",
}
