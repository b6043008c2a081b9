-- converted_leads.sql - the source query you own.
--
-- leadsync runs this query as a subquery, wrapped like
--     SELECT ... FROM ( <this query> ) src WHERE <keyset bounds> ORDER BY updated_at, lead_id, stage
-- so write a plain SELECT with no WHERE on time, no ORDER BY, no LIMIT and no trailing semicolon.
-- The query must NOT filter by time itself (no "last 7 days"): leadsync keeps a watermark per
-- destination, re-reads a lookback window for late rows, and drops events that are too old for a
-- platform with a counted reason. A time filter here would silently lose rows.
-- Filtering out rows that are not lead stage changes at all (test leads, deleted records) is fine.
--
-- Contract: one row per lead stage change; (lead_id, stage) is unique.
--
-- Required columns
--   lead_id      text       stable id of the lead in the CRM (never reused)
--   stage        text       CRM funnel stage (lead, qualified, sales_accepted, won, ...); which
--                           stages become which platform events is set in include/leadsync.yaml
--   event_time   timestamp  when the lead reached the stage; timezone-aware or UTC
--   updated_at   timestamp  when the row last changed in the warehouse (load or modify time), UTC;
--                           the incremental cursor, with lead_id and stage as tie-breakers. It must
--                           move forward whenever a row changes, so prefer the loader's sync time
--                           over a CRM "modified" field that can arrive late.
--
-- Optional columns (leave out, or select NULL, what you do not have)
--   event_id                   id shared with the browser pixel for deduplication; when NULL
--                              leadsync derives one from lead_id + stage
--   email, phone, first_name, last_name, city, state, zip, country, date_of_birth (YYYY-MM-DD),
--   gender, external_id        raw customer identifiers. Send them as the CRM holds them (any case,
--                              national phone formats with a country column): leadsync normalises
--                              and SHA-256 hashes them per platform, in memory only, and never
--                              stores or logs them raw. country is an ISO 3166-1 alpha-2 code.
--   fbc, fbp                   Meta browser cookies (_fbc, _fbp), sent as they are
--   ttclid, ttp                TikTok click id and _ttp cookie, sent as they are
--   gclid, gbraid, wbraid      Google Ads click ids, sent as they are
--   li_fat_id                  LinkedIn first-party click id (the li_fat_id URL parameter), raw
--   sc_click_id, sc_cookie1    Snapchat click id (ScCid URL parameter) and _scid cookie, raw
--   epik                       Pinterest click id (_epik cookie / &epik= parameter), sent as it is
--   rdt_cid                    Reddit click id (rdt_cid URL parameter), sent as it is
--   client_ip, user_agent, event_source_url
--                              the browser context of web leads, sent where the platform takes it
--   meta_lead_id, tiktok_lead_id
--                              the platforms' lead-ad ids (Meta leadgen_id, TikTok lead id), for
--                              CRM / conversion-lead optimisation
--   value, currency            deal value (numeric) and its ISO 4217 currency code
--   ad_user_data, ad_personalization
--                              Google consent (boolean; NULL = unspecified)
--   opted_out                  boolean marketing opt-out: such rows are never sent (counted)
--   limited_data_use           boolean Meta Limited Data Use (for example US state privacy laws)
--
-- Timestamps should be UTC. A timestamp without a time zone is read as UTC.
SELECT
    lead_id,
    stage,
    event_time,
    updated_at,
    event_id,
    email,
    phone,
    first_name,
    last_name,
    city,
    state,
    zip,
    country,
    date_of_birth,
    gender,
    external_id,
    fbc,
    fbp,
    ttclid,
    ttp,
    gclid,
    gbraid,
    wbraid,
    client_ip,
    user_agent,
    event_source_url,
    meta_lead_id,
    tiktok_lead_id,
    value,
    currency,
    ad_user_data,
    ad_personalization,
    opted_out,
    limited_data_use
FROM crm_lead_stages
