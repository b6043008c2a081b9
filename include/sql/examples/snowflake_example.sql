-- Example source query: Salesforce synced into Snowflake by Fivetran (schema SALESFORCE).
--
-- Funnel used here (adapt the status and stage names to your org):
--   lead            a Lead record is created
--   qualified       the Lead's Status first becomes 'Qualified' (LEAD_HISTORY, field history
--                   tracking must be on for Lead.Status)
--   sales_accepted  the Lead is converted: its Opportunity is created
--   won             that Opportunity first reaches the 'Closed Won' stage (OPPORTUNITY_HISTORY)
-- lead_id is the Salesforce Lead id (18 characters), kept after conversion so that all four
-- stages of one person share it.
--
-- Notes
-- * Fivetran loads Salesforce datetimes as TIMESTAMP_TZ; CONVERT_TIMEZONE('UTC', ...) hands them
--   over in UTC.
-- * updated_at is Fivetran's load time (_FIVETRAN_SYNCED) of the row that carries the stage
--   change, so a change that syncs late still lands after the watermark.
-- * Click ids, cookies, IP, user agent and landing page are custom Lead fields filled by hidden
--   form fields (GCLID__C, FBP__C, ...). Meta's fbc is rebuilt from the fbclid.
-- * ConvertedDate is a DATE in Salesforce, so the Opportunity's CreatedDate (a datetime) is used
--   as the sales_accepted time.
-- * Unquoted identifiers come back in upper case; the SQLAlchemy Snowflake dialect reports
--   them in lower case, which is what the contract's column names expect.
-- * No time filter: leadsync adds the cursor bounds around this query.
WITH lead_created AS (
    SELECT
        l.ID AS LEAD_ID,
        'lead' AS STAGE,
        l.CREATED_DATE AS EVENT_TIME,
        l._FIVETRAN_SYNCED AS UPDATED_AT,
        CAST(NULL AS NUMBER(12, 2)) AS VALUE,
        CAST(NULL AS VARCHAR) AS CURRENCY
    FROM SALESFORCE.LEAD AS l
    WHERE NOT l.IS_DELETED
),

lead_qualified AS (
    SELECT
        h.LEAD_ID,
        'qualified' AS STAGE,
        h.CREATED_DATE AS EVENT_TIME,
        h._FIVETRAN_SYNCED AS UPDATED_AT,
        CAST(NULL AS NUMBER(12, 2)) AS VALUE,
        CAST(NULL AS VARCHAR) AS CURRENCY
    FROM SALESFORCE.LEAD_HISTORY AS h
    WHERE h.FIELD = 'Status'
        AND h.NEW_VALUE = 'Qualified'
        AND NOT h.IS_DELETED
    QUALIFY ROW_NUMBER() OVER (PARTITION BY h.LEAD_ID ORDER BY h.CREATED_DATE) = 1
),

lead_converted AS (
    SELECT
        l.ID AS LEAD_ID,
        'sales_accepted' AS STAGE,
        o.CREATED_DATE AS EVENT_TIME,
        GREATEST(l._FIVETRAN_SYNCED, o._FIVETRAN_SYNCED) AS UPDATED_AT,
        CAST(NULL AS NUMBER(12, 2)) AS VALUE,
        CAST(NULL AS VARCHAR) AS CURRENCY
    FROM SALESFORCE.LEAD AS l
    JOIN SALESFORCE.OPPORTUNITY AS o
        ON o.ID = l.CONVERTED_OPPORTUNITY_ID
    WHERE l.IS_CONVERTED
        AND NOT l.IS_DELETED
        AND NOT o.IS_DELETED
),

opportunity_won AS (
    SELECT
        l.ID AS LEAD_ID,
        'won' AS STAGE,
        oh.CREATED_DATE AS EVENT_TIME,
        GREATEST(oh._FIVETRAN_SYNCED, o._FIVETRAN_SYNCED) AS UPDATED_AT,
        CAST(o.AMOUNT AS NUMBER(12, 2)) AS VALUE,
        o.CURRENCY_ISO_CODE AS CURRENCY  -- multi-currency orgs; else your corporate currency
    FROM SALESFORCE.LEAD AS l
    JOIN SALESFORCE.OPPORTUNITY AS o
        ON o.ID = l.CONVERTED_OPPORTUNITY_ID
    JOIN SALESFORCE.OPPORTUNITY_HISTORY AS oh
        ON oh.OPPORTUNITY_ID = o.ID
    WHERE oh.STAGE_NAME = 'Closed Won'
        AND NOT oh.IS_DELETED
        AND NOT o.IS_DELETED
    QUALIFY ROW_NUMBER() OVER (PARTITION BY l.ID ORDER BY oh.CREATED_DATE) = 1
),

stage_change AS (
    SELECT * FROM lead_created
    UNION ALL
    SELECT * FROM lead_qualified
    UNION ALL
    SELECT * FROM lead_converted
    UNION ALL
    SELECT * FROM opportunity_won
)

SELECT
    s.LEAD_ID AS lead_id,
    s.STAGE AS stage,
    CONVERT_TIMEZONE('UTC', s.EVENT_TIME) AS event_time,
    CONVERT_TIMEZONE('UTC', s.UPDATED_AT) AS updated_at,
    -- The browser pixel's event id travels in a hidden field; only the lead event has one.
    IFF(s.STAGE = 'lead', l.PIXEL_EVENT_ID__C, NULL) AS event_id,
    l.EMAIL AS email,
    COALESCE(l.MOBILE_PHONE, l.PHONE) AS phone,
    l.FIRST_NAME AS first_name,
    l.LAST_NAME AS last_name,
    l.CITY AS city,
    COALESCE(l.STATE_CODE, l.STATE) AS state,      -- state/country picklists give ISO codes
    l.POSTAL_CODE AS zip,
    COALESCE(l.COUNTRY_CODE, l.COUNTRY) AS country,
    TO_CHAR(l.BIRTHDATE__C, 'YYYY-MM-DD') AS date_of_birth,
    l.GENDER__C AS gender,
    COALESCE(l.CONVERTED_CONTACT_ID, l.ID) AS external_id,
    IFF(
        l.FBCLID__C IS NOT NULL,
        'fb.1.' || DATE_PART(EPOCH_MILLISECOND, l.CREATED_DATE) || '.' || l.FBCLID__C,
        NULL
    ) AS fbc,
    l.FBP__C AS fbp,
    l.TTCLID__C AS ttclid,
    l.TTP__C AS ttp,
    l.GCLID__C AS gclid,
    l.GBRAID__C AS gbraid,
    l.WBRAID__C AS wbraid,
    l.IP_ADDRESS__C AS client_ip,
    l.USER_AGENT__C AS user_agent,
    l.LANDING_PAGE__C AS event_source_url,
    l.META_LEAD_ID__C AS meta_lead_id,        -- set by the Meta Lead Ads connector
    l.TIKTOK_LEAD_ID__C AS tiktok_lead_id,
    s.VALUE AS value,
    s.CURRENCY AS currency,
    l.AD_USER_DATA_CONSENT__C AS ad_user_data,  -- NULL when the banner was never answered
    l.AD_PERSONALIZATION_CONSENT__C AS ad_personalization,
    COALESCE(l.HAS_OPTED_OUT_OF_EMAIL, FALSE) OR COALESCE(l.ADS_OPT_OUT__C, FALSE) AS opted_out,
    l.DO_NOT_SELL__C AS limited_data_use       -- US state privacy "do not sell or share"
FROM stage_change AS s
JOIN SALESFORCE.LEAD AS l
    ON l.ID = s.LEAD_ID
