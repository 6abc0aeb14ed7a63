// Where logs go and who hears about failures and cost: a Log Analytics
// workspace (container stdout/stderr and Logic App runs), an action group
// (e-mail, optional webhook) and a monthly budget that notifies it.

@minLength(2)
@maxLength(20)
param client string

param workspaceName string
param location string = resourceGroup().location
param tags object = {}

@description('Days Log Analytics keeps data (30 is included in the ingestion price).')
@minValue(30)
@maxValue(730)
param retentionInDays int = 30

@description('Daily ingestion cap in GB (-1: none). A runaway task cannot run up the log bill past it.')
param dailyQuotaGb int = 1

@description('E-mail addresses notified by alerts and the budget.')
@minLength(1)
param alertEmails array

@description('Optional HTTPS endpoint that also receives alerts (common alert schema). Empty: none.')
param alertWebhookUrl string = ''

@description('Monthly budget for the resource group, in the billing currency.')
@minValue(1)
param monthlyBudget int = 50

@description('First day of the budget period (yyyy-MM-01), fixed at the first deployment: the Consumption API refuses to change a budget\'s start date, so it has no default that could move.')
@minLength(10)
@maxLength(10)
param budgetStartDate string

resource workspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
    workspaceCapping: {
      dailyQuotaGb: dailyQuotaGb
    }
    publicNetworkAccessForIngestion: 'Enabled'
    publicNetworkAccessForQuery: 'Enabled'
  }
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-${client}-worker'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: take('wrk${client}', 12)
    enabled: true
    emailReceivers: [for (email, i) in alertEmails: {
      name: 'email-${i}'
      emailAddress: email
      useCommonAlertSchema: true
    }]
    webhookReceivers: empty(alertWebhookUrl) ? [] : [
      {
        name: 'webhook'
        serviceUri: alertWebhookUrl
        useCommonAlertSchema: true
      }
    ]
  }
}

resource budget 'Microsoft.Consumption/budgets@2023-05-01' = {
  name: 'budget-${client}-worker'
  properties: {
    category: 'Cost'
    amount: monthlyBudget
    timeGrain: 'Monthly'
    timePeriod: {
      startDate: budgetStartDate
    }
    notifications: {
      actual80: {
        enabled: true
        operator: 'GreaterThanOrEqualTo'
        threshold: 80
        thresholdType: 'Actual'
        contactEmails: alertEmails
        contactGroups: [
          actionGroup.id
        ]
      }
      forecast100: {
        enabled: true
        operator: 'GreaterThanOrEqualTo'
        threshold: 100
        thresholdType: 'Forecasted'
        contactEmails: alertEmails
        contactGroups: [
          actionGroup.id
        ]
      }
    }
  }
}

output workspaceName string = workspace.name
output workspaceId string = workspace.id
output workspaceCustomerId string = workspace.properties.customerId
output actionGroupId string = actionGroup.id
