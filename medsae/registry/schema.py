"""The registry's tables, as ordered migrations.

Each migration is a list of SQL statements; ``SCHEMA_VERSION`` is the number of migrations.
A registry opened by a newer medsae is migrated forward inside one transaction, and the applied
version is recorded in ``schema_version``. Never edit a released migration: append a new one.

Conventions: ids derived from content are sha256 hex strings; rows are append-only (results are
never updated in place); "latest" and "best" are views.
"""

from __future__ import annotations

from medsae.registry.ranking import RANKING_VIEW

MIGRATIONS: list[list[str]] = [
    # 1: the initial schema (docs/method.md#registry)
    [
        """CREATE TABLE IF NOT EXISTS experiments (
            experiment_id VARCHAR PRIMARY KEY,      -- sha256 of the resolved spec
            name VARCHAR NOT NULL,
            spec_json VARCHAR NOT NULL,             -- resolved spec, canonical JSON
            spec_hash VARCHAR NOT NULL,
            spec_path VARCHAR,
            sweep_name VARCHAR,                     -- the sweep this experiment came from, if any
            created_at TIMESTAMPTZ DEFAULT current_timestamp,
            git_commit VARCHAR,
            versions_json VARCHAR,
            host_json VARCHAR
        )""",
        """CREATE TABLE IF NOT EXISTS stages (
            stage_key VARCHAR PRIMARY KEY,
            kind VARCHAR NOT NULL,
            code_version VARCHAR NOT NULL,
            params_json VARCHAR NOT NULL,
            upstream_keys VARCHAR[],
            status VARCHAR NOT NULL,                -- 'done' (a row exists only once complete)
            started_at TIMESTAMPTZ,
            finished_at TIMESTAMPTZ,
            artifact_dir VARCHAR,
            seconds DOUBLE,
            device VARCHAR,
            summary_json VARCHAR
        )""",
        """CREATE TABLE IF NOT EXISTS experiment_stages (
            experiment_id VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            stage_key VARCHAR NOT NULL,
            PRIMARY KEY (experiment_id, kind)
        )""",
        """CREATE TABLE IF NOT EXISTS artifacts (
            stage_key VARCHAR NOT NULL,
            path VARCHAR NOT NULL,                  -- relative to the stage's artifact dir
            sha256 VARCHAR NOT NULL,
            bytes BIGINT NOT NULL,
            PRIMARY KEY (stage_key, path)
        )""",
        """CREATE TABLE IF NOT EXISTS slices (
            slices_key VARCHAR NOT NULL,            -- the slices stage that produced the row
            slice_id BIGINT NOT NULL,               -- row number in that stage's index
            slice_uid VARCHAR NOT NULL,             -- 'ct/s0001/axial/42'
            dataset VARCHAR,
            modality VARCHAR,
            image_id VARCHAR,
            plane VARCHAR,
            axis INTEGER,
            idx INTEGER,
            position DOUBLE,                        -- idx / (n_slices_along_axis - 1)
            split VARCHAR,
            institute VARCHAR,
            sex VARCHAR,
            age DOUBLE,
            age_bin VARCHAR,
            study_type VARCHAR,
            pathology VARCHAR,
            pathology_location VARCHAR,
            manufacturer VARCHAR,
            scanner_model VARCHAR,
            body_region VARCHAR,
            n_structures INTEGER,
            PRIMARY KEY (slices_key, slice_id)
        )""",
        """CREATE TABLE IF NOT EXISTS slice_structures (
            slices_key VARCHAR NOT NULL,
            slice_id BIGINT NOT NULL,
            structure VARCHAR NOT NULL,
            pixels INTEGER NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS ingest_skips (
            slices_key VARCHAR NOT NULL,
            modality VARCHAR,
            image_id VARCHAR,
            reason VARCHAR
        )""",
        """CREATE TABLE IF NOT EXISTS metrics (
            stage_key VARCHAR NOT NULL,
            split VARCHAR,                          -- train / val / test / all / NULL
            name VARCHAR NOT NULL,
            value DOUBLE,
            n BIGINT,
            target VARCHAR,                         -- probe target, query, ... (NULL if none)
            n_features INTEGER,                     -- recovery curves: N latents used
            extra_json VARCHAR
        )""",
        """CREATE TABLE IF NOT EXISTS latents (
            stage_key VARCHAR NOT NULL,             -- the summarize stage
            sae_key VARCHAR NOT NULL,               -- the train stage whose SAE this describes
            latent INTEGER NOT NULL,
            frequency DOUBLE,                       -- fraction of slices where it fires
            n_active BIGINT,
            n_patients INTEGER,
            mean_act DOUBLE,                        -- mean over firing slices
            max_act DOUBLE,
            q50 DOUBLE, q90 DOUBLE, q99 DOUBLE,     -- quantiles of firing activations
            status VARCHAR,                         -- live / dead / dense / too_rare
            top_structures VARCHAR,                 -- JSON: enrichment summary
            PRIMARY KEY (stage_key, latent)
        )""",
        """CREATE TABLE IF NOT EXISTS example_sets (
            set_id VARCHAR PRIMARY KEY,             -- hash of sampler params, seed, chosen slices
            stage_key VARCHAR NOT NULL,
            latent INTEGER NOT NULL,
            purpose VARCHAR NOT NULL,               -- explain / simulate / detect / ...
            slice_ids BIGINT[],
            activations DOUBLE[],
            roles VARCHAR[]
        )""",
        """CREATE TABLE IF NOT EXISTS prompts (
            template_hash VARCHAR PRIMARY KEY,
            name VARCHAR,
            text VARCHAR
        )""",
        """CREATE TABLE IF NOT EXISTS llm_calls (
            request_hash VARCHAR NOT NULL,
            model VARCHAR,
            template_hash VARCHAR,
            response_json VARCHAR,
            tokens_in BIGINT,
            tokens_out BIGINT,
            cost_usd DOUBLE,
            latency_s DOUBLE,
            cached BOOLEAN,
            error VARCHAR,
            created_at TIMESTAMPTZ DEFAULT current_timestamp
        )""",
        """CREATE TABLE IF NOT EXISTS explanations (
            explanation_id VARCHAR PRIMARY KEY,
            stage_key VARCHAR NOT NULL,             -- the summarize stage (latents + example sets)
            sae_key VARCHAR NOT NULL,
            latent INTEGER NOT NULL,
            explainer_model VARCHAR NOT NULL,
            template_hash VARCHAR NOT NULL,
            params_json VARCHAR,
            example_set_id VARCHAR,
            text VARCHAR,                           -- NULL when status = 'parse_failed'
            status VARCHAR,                         -- ok / parse_failed / error / baseline
            kind VARCHAR,                           -- 'explanation' or a baseline name
            request_hash VARCHAR,
            created_at TIMESTAMPTZ DEFAULT current_timestamp
        )""",
        """CREATE TABLE IF NOT EXISTS explanation_scores (
            score_id VARCHAR PRIMARY KEY,
            explanation_id VARCHAR NOT NULL,
            method VARCHAR NOT NULL,                -- pearson / spearman / auroc / detection_bacc / ...
            scorer_model VARCHAR,
            scorer_mode VARCHAR,                    -- logprob_ev / parsed_int / rule
            example_set_id VARCHAR,
            value DOUBLE,
            n INTEGER,
            n_missing INTEGER,
            chance DOUBLE,
            ci_low DOUBLE,
            ci_high DOUBLE,
            p_value DOUBLE,
            extra_json VARCHAR,
            created_at TIMESTAMPTZ DEFAULT current_timestamp
        )""",
    ],
    # explanation hygiene and scorer sanity (issue 11): examples shown to the explainer, predictions
    # recovered by the repair re-ask, scores whose predictions do not depend on the explanation
    [
        "ALTER TABLE explanations ADD COLUMN IF NOT EXISTS n_examples INTEGER",
        "ALTER TABLE explanation_scores ADD COLUMN IF NOT EXISTS n_repaired INTEGER",
        "ALTER TABLE explanation_scores ADD COLUMN IF NOT EXISTS degenerate BOOLEAN",
    ],
    # portable projects (issue 14): stage folders and spec files under the registry's folder are
    # stored relative to it (medsae/paths.py). DuckDB reports the database file's absolute path
    # with links resolved, as the old rows were written (Path.resolve()); other rows stay absolute.
    [
        f"""UPDATE {table} SET {column} = substr({column}, length(base.dir) + 2)
            FROM (SELECT regexp_replace(path, '/[^/]*$', '') AS dir FROM duckdb_databases()
                  WHERE database_name = current_database() AND path IS NOT NULL) AS base
            WHERE starts_with({table}.{column}, base.dir || '/')"""
        for table, column in (("stages", "artifact_dir"), ("experiments", "spec_path"))
    ],
    # experiment tags and a free-text note (`medsae exp tag`, issue 14)
    [
        """CREATE TABLE IF NOT EXISTS experiment_tags (
            experiment_id VARCHAR NOT NULL,
            tag VARCHAR NOT NULL,
            created_at TIMESTAMPTZ DEFAULT current_timestamp,
            PRIMARY KEY (experiment_id, tag)
        )""",
        """CREATE TABLE IF NOT EXISTS experiment_notes (
            experiment_id VARCHAR PRIMARY KEY,
            note VARCHAR NOT NULL,
            updated_at TIMESTAMPTZ DEFAULT current_timestamp
        )""",
    ],
    # grounding (issue 16): each grounded latent's best structure mask and its scores vs shuffled masks
    [
        """CREATE TABLE IF NOT EXISTS latent_grounding (
            stage_key VARCHAR NOT NULL,             -- the ground stage
            sae_key VARCHAR NOT NULL,               -- the train stage whose SAE this describes
            latent INTEGER NOT NULL,
            structure VARCHAR NOT NULL,             -- best structure: highest best-threshold IoU
            n_slices INTEGER,                       -- top held-out slices scored
            n_present INTEGER,                      -- of them, slices containing the structure
            lift DOUBLE,                            -- activation share in the mask / its area share
            iou DOUBLE,                             -- best-threshold IoU, summed over the slices
            dice DOUBLE,
            threshold DOUBLE,                       -- best threshold, fraction of the maximum activation
            pointing DOUBLE,                        -- share of slices whose map peaks inside the mask
            lift_shuffled DOUBLE,                   -- same structure, masks shuffled across slices
            iou_shuffled DOUBLE,
            dice_shuffled DOUBLE,
            pointing_shuffled DOUBLE,
            iou_shuffled_best DOUBLE,               -- best IoU over structures with shuffled masks
            dominant_structure VARCHAR,             -- largest structure in most of the top slices
            dominant_share DOUBLE,                  -- share of the top slices where it is the largest
            route VARCHAR,                          -- how maps were made: pooled_sae_on_tokens
            exact BOOLEAN,                          -- token pre-activations average to the pooled ones
            PRIMARY KEY (stage_key, latent)
        )""",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)

#: Views re-created on every migration (they hold no data, so they can change freely).
VIEWS: list[str] = [
    """CREATE OR REPLACE VIEW experiment_metrics AS
       SELECT e.name AS experiment, es.kind AS stage, m.split, m.name AS metric, m.target,
              m.n_features, m.value, m.n, m.stage_key
       FROM experiments e
       JOIN experiment_stages es USING (experiment_id)
       JOIN metrics m ON m.stage_key = es.stage_key""",
    """CREATE OR REPLACE VIEW latest_explanations AS
       SELECT * EXCLUDE (rn) FROM (
         SELECT *, row_number() OVER (PARTITION BY sae_key, latent, explainer_model, kind
                                      ORDER BY created_at DESC, explanation_id) AS rn
         FROM explanations) WHERE rn = 1""",
    RANKING_VIEW,  # the study's configuration ranking (medsae/registry/ranking.py)
]
