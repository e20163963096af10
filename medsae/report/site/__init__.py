"""The latent explorer: a static folder (index page + one page per latent) over one experiment.

``medsae report EXP -o site/`` writes it (:func:`medsae.report.site.build.build_site`). It works
from ``file://`` and from any static host and loads nothing from the network: every page carries a
Content-Security-Policy allowing only same-folder images, style and script. Modules: ``rows``
(what each page shows, from the registry), ``images`` (content-addressed PNG cache, histograms),
``build`` (rendering and the atomic swap of the folder). Templates: ``templates/site_*.j2``.
"""
