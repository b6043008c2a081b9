-- Example source query: a dbt-modelled CRM in BigQuery (dataset `my-project.analytics`).
--
-- Models used (typical marts built on top of any CRM connector):
--   fct_deal_stage_history  one row per deal entering a pipeline stage
--                           (deal_id, contact_id, stage_name, entered_at, _loaded_at)
--   dim_deals               deal_id, amount, currency_code
--   dim_contacts            one row per contact: identifiers, consent flags, _loaded_at
--   fct_form_submissions    web and lead-ad form submissions with the browser context and
--                           click ids captured at submission (hidden fields, lead-ad webhooks)
--
-- Funnel used here: pipeline stage names mapped to the leadsync stages; a contact reaches a
-- stage the first time any of its deals enters it. lead_id is the CRM contact id.
--
-- Notes
-- * BigQuery TIMESTAMP values are UTC already. If your model has DATETIME columns, convert them
--   with TIMESTAMP(column, 'your/timezone') first.
-- * updated_at is the model's load time (_loaded_at), which moves forward whenever dbt rewrites
--   the row; an incremental model must set it on every row it inserts or updates.
-- * QUALIFY needs a WHERE, GROUP BY or HAVING in the same SELECT, hence WHERE TRUE below.
-- * No time filter: leadsync adds the cursor bounds around this query.
WITH stage_mapped AS (
    SELECT
        h.contact_id,
        CASE h.stage_name
            WHEN 'New' THEN 'lead'
            WHEN 'Qualified' THEN 'qualified'
            WHEN 'Sales Accepted' THEN 'sales_accepted'
            WHEN 'Demo Scheduled' THEN 'sales_accepted'
            WHEN 'Closed Won' THEN 'won'
        END AS stage,
        h.entered_at AS event_time,
        h._loaded_at AS updated_at,
        h.deal_id
    FROM `my-project.analytics.fct_deal_stage_history` AS h
    WHERE h.stage_name IN ('New', 'Qualified', 'Sales Accepted', 'Demo Scheduled', 'Closed Won')
),

stage_entered AS (
    -- One row per (contact, stage): the first time any of the contact's deals got there.
    SELECT *
    FROM stage_mapped AS m
    WHERE TRUE
    QUALIFY ROW_NUMBER() OVER (
        PARTITION BY m.contact_id, m.stage ORDER BY m.event_time, m.deal_id
    ) = 1
),

first_submission AS (
    -- The submission that created the contact: its click ids and browser context are the ones
    -- the ad platforms can attribute.
    SELECT *
    FROM `my-project.analytics.fct_form_submissions` AS f
    WHERE TRUE
    QUALIFY ROW_NUMBER() OVER (PARTITION BY f.contact_id ORDER BY f.submitted_at) = 1
)

SELECT
    CAST(s.contact_id AS STRING) AS lead_id,
    s.stage,
    s.event_time,
    GREATEST(s.updated_at, c._loaded_at) AS updated_at,
    IF(s.stage = 'lead', f.pixel_event_id, NULL) AS event_id,
    c.email,
    c.phone,
    c.first_name,
    c.last_name,
    c.city,
    c.region AS state,
    c.postal_code AS zip,
    c.country_code AS country,
    FORMAT_DATE('%Y-%m-%d', c.birth_date) AS date_of_birth,
    c.gender,
    CAST(c.contact_id AS STRING) AS external_id,
    f.fbc,
    f.fbp,
    f.ttclid,
    f.ttp,
    f.gclid,
    f.gbraid,
    f.wbraid,
    f.ip_address AS client_ip,
    f.user_agent,
    f.page_url AS event_source_url,
    f.meta_lead_id,      -- leadgen_id from the Meta Lead Ads webhook
    f.tiktok_lead_id,
    -- Deal value only on won (the contract also accepts an expected value on other stages).
    IF(s.stage = 'won', CAST(d.amount AS NUMERIC), NULL) AS value,
    IF(s.stage = 'won', d.currency_code, NULL) AS currency,
    c.consent_ad_user_data AS ad_user_data,            -- NULL = unknown
    c.consent_ad_personalization AS ad_personalization,
    COALESCE(c.marketing_opt_out, FALSE) AS opted_out,
    c.ccpa_do_not_sell AS limited_data_use
FROM stage_entered AS s
JOIN `my-project.analytics.dim_contacts` AS c
    ON c.contact_id = s.contact_id
LEFT JOIN `my-project.analytics.dim_deals` AS d
    ON d.deal_id = s.deal_id
LEFT JOIN first_submission AS f
    ON f.contact_id = s.contact_id
