-- Example source query: HubSpot synced into PostgreSQL by Fivetran (schema "hubspot").
--
-- Funnel used here (adapt the mapping to your lifecycle and pipelines):
--   lead            HubSpot lifecycle stage "lead"
--   qualified       lifecycle stage "marketingqualifiedlead"
--   sales_accepted  lifecycle stage "salesqualifiedlead"
--   won             the first of the contact's deals entering a closed-won pipeline stage
-- lead_id is the HubSpot contact id, so all stages of one person share it.
--
-- Tables (Fivetran's HubSpot schema; property_* columns are HubSpot contact properties):
--   contact_property_history  one row per property change (contact_id, name, value, timestamp)
--   deal_stage                one row per deal stage entered (deal_id, value = stage id, date_entered)
--   deal_pipeline_stage       stage ids, labels, closed_won flag
--   deal, deal_contact, contact
--
-- Notes
-- * Fivetran writes UTC "timestamp without time zone"; AT TIME ZONE 'UTC' makes that explicit.
-- * updated_at is the load time (_fivetran_synced), not a HubSpot date: a change synced late
--   still gets a fresh cursor, so the next run sees it. Taking the greatest with the contact's
--   sync time re-surfaces a stage row when the contact is corrected (for example an email added);
--   leadsync's ledger keeps events that were already delivered from being sent twice.
-- * Click ids and browser context come from hidden form fields stored as custom contact
--   properties (fbp, ttclid, client_ip, user_agent, ...); HubSpot's own hs_google_click_id and
--   hs_facebook_click_id are used where present. Meta's fbc is rebuilt from the fbclid as
--   fb.1.<first seen, ms>.<fbclid>.
-- * No time filter: leadsync adds the cursor bounds around this query.
WITH lifecycle_stage AS (
    -- First time a contact entered each lifecycle stage (later flips are not new events).
    SELECT DISTINCT ON (h.contact_id, m.stage)
        h.contact_id,
        m.stage,
        h."timestamp" AS event_time,
        h._fivetran_synced AS updated_at,
        CAST(NULL AS numeric) AS value,
        CAST(NULL AS text) AS currency
    FROM hubspot.contact_property_history AS h
    JOIN (
        VALUES
            ('lead', 'lead'),
            ('marketingqualifiedlead', 'qualified'),
            ('salesqualifiedlead', 'sales_accepted')
    ) AS m (hubspot_value, stage)
        ON m.hubspot_value = h.value
    WHERE h.name = 'lifecyclestage'
    ORDER BY h.contact_id, m.stage, h."timestamp"
),

won_deal AS (
    -- The contact's first deal to enter a closed-won stage, with that deal's amount.
    SELECT DISTINCT ON (dc.contact_id)
        dc.contact_id,
        'won' AS stage,
        ds.date_entered AS event_time,
        GREATEST(ds._fivetran_synced, d._fivetran_synced) AS updated_at,
        CAST(d.property_amount AS numeric) AS value,
        d.property_deal_currency_code AS currency
    FROM hubspot.deal_stage AS ds
    JOIN hubspot.deal_pipeline_stage AS ps
        ON ps.stage_id = ds.value AND ps.closed_won
    JOIN hubspot.deal AS d
        ON d.deal_id = ds.deal_id AND NOT d.is_deleted
    JOIN hubspot.deal_contact AS dc
        ON dc.deal_id = ds.deal_id
    ORDER BY dc.contact_id, ds.date_entered
),

stage_change AS (
    SELECT * FROM lifecycle_stage
    UNION ALL
    SELECT * FROM won_deal
)

SELECT
    CAST(s.contact_id AS text) AS lead_id,
    s.stage,
    s.event_time AT TIME ZONE 'UTC' AS event_time,
    GREATEST(s.updated_at, c._fivetran_synced) AT TIME ZONE 'UTC' AS updated_at,
    -- Only the lead event was also tracked by the browser pixel (same id as the form's hidden
    -- field); other stages let leadsync derive the id.
    CASE WHEN s.stage = 'lead' THEN c.property_pixel_event_id END AS event_id,
    c.property_email AS email,
    COALESCE(c.property_mobilephone, c.property_phone) AS phone,
    c.property_firstname AS first_name,
    c.property_lastname AS last_name,
    c.property_city AS city,
    c.property_state AS state,
    c.property_zip AS zip,
    c.property_country AS country,
    TO_CHAR(c.property_date_of_birth, 'YYYY-MM-DD') AS date_of_birth,
    c.property_gender AS gender,
    CAST(c.id AS text) AS external_id,
    CASE
        WHEN c.property_hs_facebook_click_id IS NOT NULL
            THEN 'fb.1.'
                || CAST(FLOOR(EXTRACT(EPOCH FROM c.property_createdate) * 1000) AS bigint)
                || '.' || c.property_hs_facebook_click_id
    END AS fbc,
    c.property_fbp AS fbp,
    c.property_ttclid AS ttclid,
    c.property_ttp AS ttp,
    c.property_hs_google_click_id AS gclid,
    c.property_gbraid AS gbraid,
    c.property_wbraid AS wbraid,
    c.property_client_ip AS client_ip,
    c.property_user_agent AS user_agent,
    c.property_hs_analytics_first_url AS event_source_url,
    c.property_meta_lead_id AS meta_lead_id,
    c.property_tiktok_lead_id AS tiktok_lead_id,
    s.value,
    s.currency,
    -- Consent captured by the form's consent banner (NULL = not asked).
    c.property_ad_user_data_consent AS ad_user_data,
    c.property_ad_personalization_consent AS ad_personalization,
    -- Whatever your privacy policy ties to ad measurement; here the global email opt-out.
    COALESCE(c.property_hs_email_optout, FALSE) AS opted_out,
    -- "Do not sell or share" requests from US states with such laws.
    c.property_do_not_sell AS limited_data_use
FROM stage_change AS s
JOIN hubspot.contact AS c
    ON c.id = s.contact_id
WHERE NOT COALESCE(c._fivetran_deleted, FALSE)
